"""Flat parameter store: one contiguous buffer for every parameter and one for every gradient.

Layers declare `Param`s (a name, a shape, an initializer, flags). `ParamStore.from_module(model)` then allocates two
flat arrays (`data`, `grad`) and makes each `Param.data` / `Param.grad` a *view* into them. So:
  - an optimizer step is a handful of vector operations over `store.data` (masks for no-decay segments),
  - an all-reduce is one call (or a few, on contiguous buckets) over `store.grad`,
  - a checkpoint is the buffer plus its layout table (name, offset, shape).

Pitfall: every update must be in place (`p.data -= ...`, `np.multiply(..., out=p.data)`); rebinding `p.data = ...`
detaches the view from the buffer. Tied parameters are one `Param` object registered under two names: it gets one
segment, under the first name; the second name is recorded as an alias.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

Initializer = Callable[[np.random.Generator, tuple, np.dtype], np.ndarray]


@dataclass(eq=False)
class Param:
    """One named parameter. Before the store is built it is only a spec (`data is None`)."""

    shape: tuple
    init: Initializer | None = None  # None -> zeros
    decay: bool = True  # take weight decay (AdamW / L2)? biases, norms and embeddings default to False
    name: str | None = None
    data: np.ndarray | None = field(default=None, repr=False)
    grad: np.ndarray | None = field(default=None, repr=False)
    offset: int = -1

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class ParamStore:
    """Owns the flat `data` and `grad` buffers and the layout table.

    params: (name, Param) pairs in registration order; a Param seen again (same object) is an alias (tied weight).
    dtype: float32 by default, float64 for gradient checks.
    seed: seeds the initializers, which run in registration order, so the same model and seed give the same bits.
    """

    def __init__(self, params: Iterable[tuple[str, Param]], dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        self.params: dict[str, Param] = {}
        self.aliases: dict[str, str] = {}  # tied name -> owning name
        seen: dict[int, str] = {}
        for name, p in params:
            if id(p) in seen:
                self.aliases[name] = seen[id(p)]
                continue
            if name in self.params:
                raise ValueError(f"parameter name {name!r} registered twice")
            seen[id(p)] = name
            self.params[name] = p
        offset = 0
        for name, p in self.params.items():
            p.name, p.offset = name, offset
            offset += p.size
        self.size = offset
        self.data = np.zeros(self.size, dtype=self.dtype)
        self.grad = np.zeros(self.size, dtype=self.dtype)
        rng = np.random.default_rng(seed)
        for p in self.params.values():
            p.data = self.data[p.offset:p.offset + p.size].reshape(p.shape)
            p.grad = self.grad[p.offset:p.offset + p.size].reshape(p.shape)
            if p.init is not None:
                p.data[...] = p.init(rng, p.shape, self.dtype)
        self._decay_mask: np.ndarray | None = None

    @classmethod
    def from_module(cls, module, dtype=np.float32, seed: int = 0) -> "ParamStore":
        store = cls(module.named_params(), dtype=dtype, seed=seed)
        module.dtype = store.dtype
        return store

    def __getitem__(self, name: str) -> Param:
        return self.params[self.aliases.get(name, name)]

    def __iter__(self):
        return iter(self.params.items())

    def __len__(self) -> int:
        return len(self.params)

    def zero_grad(self) -> None:
        self.grad.fill(0)

    def decay_mask(self) -> np.ndarray:
        """(size,) bool: True where weight decay applies."""
        if self._decay_mask is None:
            m = np.zeros(self.size, dtype=bool)
            for p in self.params.values():
                m[p.offset:p.offset + p.size] = p.decay
            self._decay_mask = m
        return self._decay_mask

    def layout(self) -> list[dict]:
        """The table checkpoints and communicators use: name, offset, shape, decay (plus tied aliases)."""
        rows = [{"name": n, "offset": p.offset, "shape": list(p.shape), "decay": p.decay}
                for n, p in self.params.items()]
        for alias, owner in self.aliases.items():
            rows.append({"name": alias, "tied_to": owner})
        return rows

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, keyed by name (tied aliases omitted: they are the same segment)."""
        return {n: p.data.copy() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        missing = [n for n in self.params if n not in state]
        unexpected = [n for n in state if n not in self.params and n not in self.aliases]
        if strict and (missing or unexpected):
            raise KeyError(f"state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for n, p in self.params.items():
            if n in state:
                v = np.asarray(state[n])
                if v.shape != p.shape:
                    raise ValueError(f"parameter {n!r}: shape {v.shape} in state, {p.shape} in the model")
                p.data[...] = v

    def checksum(self) -> str:
        """A short hash of the parameter bits (ranks compare it to prove they hold the same model)."""
        import hashlib
        return hashlib.sha256(self.data.tobytes()).hexdigest()[:16]
