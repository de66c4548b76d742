"""The layer contract and containers.

    y, backward = layer(x, train=True)   # backward closes over what it needs
    dx = backward(dy)                    # accumulates into the layer's Param.grad (+=) and returns dx

State needed for backward lives in the closure, never on `self`: a layer can be applied twice in one step (weight
tying, an RNN cell over time) and inference keeps nothing. `train` defaults to the module's mode (`model.train()` /
`model.eval()`, as in PyTorch); pass it explicitly to override for one call.

Parameters and sub-modules are registered by attribute assignment, in order, like PyTorch's nn.Module; names are
dotted paths (`decoder.layers.1.self_attn.w_qkv`). Observers (activation statistics, the non-finite detector) attach
through `_HOOKS` (below) without any layer knowing: the gradient reducer, engine/debug.py.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from .params import Param

Backward = Callable[..., Any]

# Observers of every module call: fn(module, phase, value) with phase "forward" (value = output) or "backward"
# (value = input gradient returned). Empty on the hot path: one truthiness test per call.
_HOOKS: list[Callable] = []


class Module:
    training: bool = True
    dtype: np.dtype = np.dtype(np.float32)  # set by ParamStore.from_module on the root; read via the root only

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "path", "")

    def __setattr__(self, name: str, value: Any) -> None:
        if "_params" not in self.__dict__:
            Module.__init__(self)
        if isinstance(value, Param):
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
            value._set_path(f"{self.path}.{name}" if self.path else name)
        object.__setattr__(self, name, value)

    def _set_path(self, path: str) -> None:
        object.__setattr__(self, "path", path)
        for name, child in self._children.items():
            child._set_path(f"{path}.{name}")

    # -- the contract ----------------------------------------------------------------------------------------------
    def forward(self, *inputs, train: bool) -> tuple[Any, Backward]:
        raise NotImplementedError

    def __call__(self, *inputs, train: bool | None = None, **kwargs) -> tuple[Any, Backward]:
        train = self.training if train is None else train
        out, backward = self.forward(*inputs, train=train, **kwargs)
        if _HOOKS:
            return _observe(self, out, backward)
        return out, backward

    # -- registry ----------------------------------------------------------------------------------------------------
    def named_params(self, prefix: str = "") -> Iterator[tuple[str, Param]]:
        for name, p in self._params.items():
            yield (f"{prefix}{name}", p)
        for name, child in self._children.items():
            yield from child.named_params(f"{prefix}{name}.")

    def register_buffer(self, name: str, value: np.ndarray) -> None:
        """Non-trained state that is saved and restored (BatchNorm's running statistics): not in the gradient
        buffer, never touched by the optimizer. Update it in place (`buf[...] = ...`)."""
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name, b in self._buffers.items():
            yield (f"{prefix}{name}", b)
        for name, child in self._children.items():
            yield from child.named_buffers(f"{prefix}{name}.")

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix.rstrip("."), self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def children(self) -> Iterator["Module"]:
        return iter(self._children.values())

    def train(self, mode: bool = True) -> "Module":
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path or ''})"


def _observe(module: Module, out, backward):
    for hook in _HOOKS:
        hook(module, "forward", out)
    if backward is None:  # a forward-only (train=False) call: nothing to observe later
        return out, None

    def observed_backward(*grads):
        dx = backward(*grads)
        for hook in _HOOKS:
            hook(module, "backward", dx)
        return dx

    return out, observed_backward


class Sequential(Module):
    """Chains single-input layers; backward runs the closures in reverse."""

    def __init__(self, *layers: Module):
        super().__init__()
        self.layers: list[Module] = []
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)
            self.layers.append(layer)

    def forward(self, x, *, train: bool):
        backwards = []
        for layer in self.layers:
            x, bwd = layer(x, train=train)
            backwards.append(bwd)

        def backward(dy):
            for bwd in reversed(backwards):
                dy = bwd(dy)
            return dy

        return x, backward

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]


class ModuleList(Module):
    """Named children `0, 1, ...` with no forward of its own (e.g. a stack of Transformer blocks)."""

    def __init__(self, modules=()):
        super().__init__()
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> None:
        setattr(self, str(len(self._items)), m)
        self._items.append(m)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Module:
        return self._items[i]


def seed_rngs(root: Module, seed: int) -> None:
    """Reseed every module that draws random numbers (those with an `rng` attribute, e.g. Dropout), each from its
    own child of SeedSequence(seed), in registration order: the same model and seed give the same masks."""
    users = [m for _, m in root.named_modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]
    for m, ss in zip(users, np.random.SeedSequence(seed).spawn(len(users))):
        object.__setattr__(m, "rng", np.random.default_rng(ss))
