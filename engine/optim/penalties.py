"""Explicit L1 / L2 penalties that add their gradient to store.grad and return their value (to add to the loss).

    loss += l2_penalty(store, 1e-4)   # 0.5 * coeff * sum(p^2) over decay=True params; grad += coeff * p
    loss += l1_penalty(store, 1e-5)   # coeff * sum(|p|);                             grad += coeff * sign(p)

Both honour store.decay_mask() (decay_mask=False: every parameter). Call them after the backward of the data loss
and before the optimizer step; under data parallelism call them after the all-reduce (each rank holds the same p).
"""
from __future__ import annotations

import numpy as np

from ..params import ParamStore


def _masked_params(store: ParamStore, decay_mask: bool) -> np.ndarray:
    if not decay_mask:
        return store.data
    mask = store.decay_mask()
    return store.data * mask  # (size,) zeros where no decay


def l2_penalty(store: ParamStore, coeff: float, decay_mask: bool = True) -> float:
    """0.5 * coeff * ||p||^2; adds coeff * p to the grads."""
    p = _masked_params(store, decay_mask)
    value = 0.5 * coeff * float(np.dot(p.astype(np.float64), p.astype(np.float64)))
    store.grad += coeff * p
    return value


def l1_penalty(store: ParamStore, coeff: float, decay_mask: bool = True) -> float:
    """coeff * sum |p|; adds coeff * sign(p) to the grads (0 at p = 0)."""
    p = _masked_params(store, decay_mask)
    value = coeff * float(np.abs(p).sum(dtype=np.float64))
    store.grad += coeff * np.sign(p)
    return value
