"""Debugging aids that observe a model through engine.module._HOOKS, without any layer knowing.

    with record_stats(model) as stats:          # per layer (module path): activation mean/std, dead-ReLU share,
        y, backward = model(x)                  # gradient norms of the layer's Params and of its input gradient
        backward(dy)
    print(stats.table())

    with detect_nonfinite(model):               # raises NonFiniteError naming the FIRST layer (path, phase)
        ...                                     # whose output / input gradient holds NaN or Inf

    name = first_nonfinite_grad(store)          # the first parameter (layout order) whose grad is not finite

Hooks fire when a module call returns (forward) and when its backward returns, so the innermost layer that made a
NaN reports before the containers around it. Values that are tuples are checked element by element; non-array
values (decoder states, None) are skipped. The model's input itself is not observed: a NaN in x is reported at the
first layer. The hooks cost a full pass over each activation: debug runs only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .module import _HOOKS, Module
from .params import ParamStore

ROOT = "<root>"  # the name reported for the model itself (its path is "")


def _arrays(value) -> list[np.ndarray]:
    """The floating arrays in a hook value (an array, a tuple/list of them, or anything else)."""
    if isinstance(value, np.ndarray):
        return [value] if np.issubdtype(value.dtype, np.floating) else []
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []


def _is_relu_like(module: Module) -> bool:
    """Layers whose outputs are exactly 0 on half their domain: ReLU and its clipped kin (ReLU6, ...)."""
    return getattr(module, "relu_like", None) or type(module).__name__ in ("ReLU", "ReLU6", "ClippedReLU")


@contextlib.contextmanager
def _hooked(fn) -> Iterator[None]:
    _HOOKS.append(fn)
    try:
        yield
    finally:
        _HOOKS.remove(fn)


def _paths(model: Module) -> dict[int, str]:
    return {id(m): (path or ROOT) for path, m in model.named_modules()}


# -- activation and gradient statistics ------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Statistics of one layer accumulated over every call in the `record_stats` block."""
    path: str
    kind: str
    calls: int = 0
    n: int = 0  # output elements seen
    _sum: float = 0.0
    _sumsq: float = 0.0
    zeros: int = 0
    relu_like: bool = False
    input_grad_sq: float = 0.0  # sum of squares of the input gradients it returned (over calls)
    param_grad_norm: float | None = None  # norm of its Params' grads after its last backward (None: no Params)
    backward_calls: int = 0

    @property
    def mean(self) -> float:
        return self._sum / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if not self.n:
            return math.nan
        return math.sqrt(max(self._sumsq / self.n - self.mean ** 2, 0.0))

    @property
    def dead_fraction(self) -> float | None:
        """Share of exact zeros in the outputs (ReLU-like layers only)."""
        return self.zeros / self.n if (self.relu_like and self.n) else None

    @property
    def input_grad_norm(self) -> float | None:
        return math.sqrt(self.input_grad_sq) if self.backward_calls else None


@dataclass
class Stats:
    layers: dict[str, LayerStats] = field(default_factory=dict)  # module path -> stats, in first-call order

    def __getitem__(self, path: str) -> LayerStats:
        return self.layers[path]

    def dead_layers(self, threshold: float = 0.99) -> list[str]:
        """ReLU-like layers whose share of exact-zero outputs is at least threshold."""
        return [p for p, s in self.layers.items() if s.dead_fraction is not None and s.dead_fraction >= threshold]

    def table(self) -> str:
        def fmt(v):
            return "-" if v is None else f"{v:.3g}"

        rows = [f"{'layer':<32} {'kind':<12} {'mean':>10} {'std':>10} {'dead':>6} {'|dW|':>10} {'|dx|':>10}"]
        for p, s in self.layers.items():
            rows.append(f"{p:<32} {s.kind:<12} {fmt(s.mean):>10} {fmt(s.std):>10} {fmt(s.dead_fraction):>6} "
                        f"{fmt(s.param_grad_norm):>10} {fmt(s.input_grad_norm):>10}")
        return "\n".join(rows)


@contextlib.contextmanager
def record_stats(model: Module) -> Iterator[Stats]:
    """Collect per-layer statistics of every forward and backward run inside the block (see LayerStats)."""
    paths = _paths(model)
    modules = {id(m): m for _, m in model.named_modules()}
    stats = Stats()

    def hook(module, phase, value):
        path = paths.get(id(module))
        if path is None:
            return  # a module of another model
        s = stats.layers.get(path)
        if s is None:
            s = stats.layers[path] = LayerStats(path, type(module).__name__, relu_like=bool(_is_relu_like(module)))
        arrays = _arrays(value)
        if phase == "forward":
            s.calls += 1
            for a in arrays:
                s.n += a.size
                s._sum += float(a.sum(dtype=np.float64))
                s._sumsq += float(np.square(a, dtype=np.float64).sum())
                if s.relu_like:
                    s.zeros += a.size - int(np.count_nonzero(a))
        else:
            s.backward_calls += 1
            s.input_grad_sq += sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays)
            grads = [p.grad for _, p in modules[id(module)].named_params() if p.grad is not None]
            if grads:  # accumulated so far: after the last backward of this layer, its final gradient
                s.param_grad_norm = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads))

    with _hooked(hook):
        yield stats


# -- non-finite detection --------------------------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """A layer produced NaN/Inf. path: module path ('<root>' for the model), phase: 'forward' | 'backward'."""

    def __init__(self, path: str, phase: str, kind: str, n_nan: int, n_inf: int, size: int):
        what = "output" if phase == "forward" else "input gradient"
        super().__init__(f"non-finite values in the {phase} {what} of layer {path!r} ({kind}): {n_nan} NaN, "
                         f"{n_inf} Inf of {size} elements")
        self.path, self.phase, self.kind = path, phase, kind


@contextlib.contextmanager
def detect_nonfinite(model: Module) -> Iterator[None]:
    """Raise NonFiniteError at the first layer of `model` whose forward output or returned input gradient holds
    NaN or Inf, inside the block."""
    paths = _paths(model)

    def hook(module, phase, value):
        path = paths.get(id(module))
        if path is None:
            return
        for a in _arrays(value):
            # a sum is NaN/Inf iff some element is (or the finite sum overflows: then count before accusing)
            if not np.isfinite(a.sum(dtype=np.float64)):
                n_nan = int(np.count_nonzero(np.isnan(a)))
                n_inf = int(np.count_nonzero(np.isinf(a)))
                if n_nan or n_inf:
                    raise NonFiniteError(path, phase, type(module).__name__, n_nan, n_inf, a.size)

    with _hooked(hook):
        yield


def first_nonfinite(store: ParamStore, which: str = "grad") -> str | None:
    """Name of the first parameter (layout order) whose `which` ('grad' or 'data') segment holds NaN/Inf."""
    buf = {"grad": store.grad, "data": store.data}[which]
    # one pass: any NaN/Inf element makes the sum non-finite; a finite sum proves every element finite
    if np.isfinite(buf.sum(dtype=np.float64)):
        return None
    bad = np.flatnonzero(~np.isfinite(buf))
    if bad.size == 0:
        return None
    i = int(bad[0])
    for name, p in store:
        if p.offset <= i < p.offset + p.size:
            return name
    raise AssertionError(f"offset {i} is outside every parameter")


def first_nonfinite_grad(store: ParamStore) -> str | None:
    """Name of the first parameter whose gradient holds NaN/Inf, or None when every gradient is finite."""
    return first_nonfinite(store, "grad")


__all__ = ["record_stats", "Stats", "LayerStats", "detect_nonfinite", "NonFiniteError", "first_nonfinite",
           "first_nonfinite_grad", "ROOT"]
