"""Gradient clipping over the flat gradient buffer (after the all-reduce, so every rank clips the same vector).

clip_grad_norm follows torch.nn.utils.clip_grad_norm_: coefficient max_norm / (total_norm + 1e-6), applied only
when it is below 1. The norm is accumulated in float64 over blocks of the buffer (no float64 copy of the whole
buffer), so a float32 buffer of many millions of elements gets the same norm as a float64 computation.
Non-finite total norm: the gradient is left untouched and the norm returned (the caller skips the step, or passes
error_if_nonfinite=True to raise). torch would instead scale every gradient by NaN.
"""
from __future__ import annotations

import math

import numpy as np

_BLOCK = 1 << 16  # elements per float64 conversion block: 512 KB in float64, fits L2


def grad_sq_norm(grad_flat: np.ndarray) -> float:
    """sum(g^2) accumulated in float64. grad_flat: (n,) any float dtype."""
    g = grad_flat.reshape(-1)
    if g.dtype == np.float64:
        return float(np.dot(g, g))
    buf = np.empty(min(_BLOCK, g.size), dtype=np.float64)
    total = 0.0
    for start in range(0, g.size, _BLOCK):
        chunk = g[start:start + _BLOCK]
        b = buf[:chunk.size]
        b[...] = chunk
        total += float(np.dot(b, b))
    return total


def clip_grad_norm(grad_flat: np.ndarray, max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    """Scale grad_flat in place so its L2 norm is at most max_norm. Returns the total norm BEFORE clipping."""
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    total = math.sqrt(grad_sq_norm(grad_flat))
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise FloatingPointError(f"clip_grad_norm: the total gradient norm is {total}")
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        grad_flat *= coef
    return total


def clip_grad_value(grad_flat: np.ndarray, value: float) -> None:
    """Clamp every gradient element to [-value, value], in place."""
    if not value > 0:
        raise ValueError(f"clip_grad_value: value must be > 0, got {value}")
    np.clip(grad_flat, -value, value, out=grad_flat)


__all__ = ["clip_grad_norm", "clip_grad_value", "grad_sq_norm"]
