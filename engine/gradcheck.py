"""Gradient checks: float64 central differences against the hand-written backward.

    store = ParamStore.from_module(layer, dtype=np.float64)
    errors = check_module(layer, [x])            # {"W": 3e-11, "b": 1e-12, "input0": 2e-11}
    assert_gradcheck(layer, [x])                  # raises with the worst parameter named

The scalar checked is L = sum(y * c) for a fixed random cotangent c, so dL/dy = c. Tensors up to `full_max`
elements are checked element by element; larger ones along `n_dirs` random directions (chainer's trick): the
directional derivative (L(p + eps d) - L(p - eps d)) / 2 eps against <grad, d>.
Relative error of a tensor: ||analytic - numeric|| / max(||analytic||, ||numeric||), or 0 when both are ~0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .params import ParamStore


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _rel_err(a: np.ndarray, n: np.ndarray, atol: float = 1e-12) -> float:
    a, n = np.ravel(a), np.ravel(n)
    scale = max(np.linalg.norm(a), np.linalg.norm(n))
    diff = np.linalg.norm(a - n)
    if scale < atol:
        return float(diff)
    return float(diff / scale)


def _directional(f: Callable[[], float], x: np.ndarray, d: np.ndarray, eps: float) -> float:
    orig = x.copy()
    x += eps * d
    fp = f()
    x[...] = orig - eps * d
    fm = f()
    x[...] = orig
    return (fp - fm) / (2 * eps)


def _numeric_vs_analytic(f, x, g, eps, n_dirs, full_max, rng):
    """Return (analytic, numeric) vectors for tensor x with analytic gradient g."""
    if x.size <= full_max:
        num = np.zeros(x.size)
        flat = x.reshape(-1)
        for i in range(x.size):
            d = np.zeros(x.size)
            d[i] = 1.0
            num[i] = _directional(f, flat, d, eps)
        return g.reshape(-1).astype(np.float64), num
    ana, num = [], []
    for _ in range(n_dirs):
        d = rng.standard_normal(x.shape)
        ana.append(float(np.sum(g * d)))
        num.append(_directional(f, x, d, eps))
    return np.array(ana), np.array(num)


def check_module(module, inputs: Sequence[np.ndarray], *, wrt: Sequence[int] | None = None, train: bool = True,
                 forward_kwargs: dict | None = None, before_forward: Callable[[], None] | None = None,
                 eps: float = 1e-6, n_dirs: int = 4, full_max: int = 48, seed: int = 0,
                 params: bool = True) -> dict[str, float]:
    """Relative error of every parameter gradient and of the gradients w.r.t. float inputs `wrt` (default: all
    floating inputs). Builds a float64 ParamStore if the module has none. `before_forward` runs before every
    forward (e.g. to reseed a dropout generator so every evaluation draws the same mask)."""
    named = list(module.named_params())
    if any(p.data is None for _, p in named):
        ParamStore.from_module(module, dtype=np.float64, seed=seed)
    for name, p in named:
        if p.data.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 parameters; {name} is {p.data.dtype}")
    inputs = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in inputs]
    if wrt is None:
        wrt = [i for i, x in enumerate(inputs) if isinstance(x, np.ndarray) and x.dtype == np.float64]
    kw = forward_kwargs or {}
    # A stream of its own (not default_rng(seed + 1)): tests commonly draw their inputs from small integer seeds,
    # and a cotangent equal to the input can make a true gradient vanish and the check fail spuriously.
    rng = np.random.default_rng([seed, 0x6C0])

    def run():
        if before_forward:
            before_forward()
        return module(*inputs, train=train, **kw)

    y, backward = run()
    ys = _as_tuple(y)
    cots = tuple(rng.standard_normal(np.shape(t)) if t is not None else None for t in ys)

    def loss() -> float:
        yy = _as_tuple(run()[0])
        return float(sum(np.sum(a * c) for a, c in zip(yy, cots) if c is not None))

    seen = {}
    for name, p in named:
        if id(p) not in seen:
            seen[id(p)] = name
            p.grad[...] = 0
    dx = backward(*cots) if isinstance(y, (tuple, list)) else backward(cots[0])
    dxs = _as_tuple(dx)
    errors: dict[str, float] = {}
    if params:
        for name, p in named:
            if seen.get(id(p)) != name:
                continue  # tied alias: checked under its owner
            a, n = _numeric_vs_analytic(loss, p.data, p.grad.copy(), eps, n_dirs, full_max, rng)
            errors[name] = _rel_err(a, n)
    for i in wrt:
        if i >= len(dxs) or dxs[i] is None:
            raise AssertionError(f"backward returned no gradient for input {i}")
        a, n = _numeric_vs_analytic(loss, inputs[i], np.asarray(dxs[i]), eps, n_dirs, full_max, rng)
        errors[f"input{i}"] = _rel_err(a, n)
    return errors


def assert_gradcheck(module, inputs, tol: float = 1e-6, **kw) -> dict[str, float]:
    errors = check_module(module, inputs, **kw)
    if not errors:
        raise AssertionError("gradcheck checked nothing: no parameters and no float64 inputs")
    worst = max(errors, key=errors.get)
    if errors[worst] > tol:
        raise AssertionError(f"gradient check failed for {type(module).__name__}: {worst} rel. error "
                             f"{errors[worst]:.3g} > {tol:g}; all: {errors}")
    return errors


def check_function(fn: Callable, inputs: Sequence[np.ndarray], grads: Sequence[np.ndarray], *,
                   eps: float = 1e-6, n_dirs: int = 4, full_max: int = 48, seed: int = 0) -> dict[str, float]:
    """For a scalar function `fn(*inputs) -> float` whose analytic gradients `grads` (one per input, None to skip)
    were computed by the caller (e.g. a loss returning `(loss, dlogits)`)."""
    rng = np.random.default_rng(seed)
    inputs = [np.array(x, copy=True) for x in inputs]
    errors = {}
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        a, n = _numeric_vs_analytic(lambda: float(fn(*inputs)), x, np.asarray(g, np.float64), eps, n_dirs,
                                    full_max, rng)
        errors[f"input{i}"] = _rel_err(a, n)
    return errors
