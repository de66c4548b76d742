"""LR range test (Smith 2017; fastai's lr_find): raise the lr exponentially over num_steps training steps, record the
loss, stop when it diverges, suggest the lr at the steepest descent of the smoothed loss curve.

    def step(lr):                       # one training step at this lr; returns its loss
        store.zero_grad(); loss, backward = ...; backward(...); opt.step(lr=lr); return loss
    result = find_lr(step, store=store, optimizer=opt)   # parameters and optimizer state restored afterwards
    result.suggested_lr, result.lrs, result.losses
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # raw
    smoothed: list[float]  # bias-corrected exponential moving average (fastai)
    suggested_lr: float | None  # None when too few steps ran to judge
    diverged: bool


def find_lr(step_fn: Callable[[float], float], *, min_lr: float = 1e-7, max_lr: float = 10.0, num_steps: int = 100,
            beta: float = 0.98, diverge_factor: float = 4.0, skip_start: int = 5, skip_end: int = 2,
            store=None, optimizer=None) -> LRFinderResult:
    """Run step_fn(lr) for lr = min_lr * (max_lr / min_lr) ** (i / (num_steps - 1)), i = 0 .. num_steps - 1.

    Stops early when the loss is non-finite or the smoothed loss exceeds diverge_factor x its best. The suggestion is
    the lr where d(smoothed loss) / d(log lr) is most negative, ignoring skip_start first and skip_end last points
    (the average is still warming up there, and the end is where it blows up). store / optimizer, when given, are
    snapshotted and restored afterwards, so the range test leaves the model as it found it.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"find_lr: need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if num_steps < 2:
        raise ValueError(f"find_lr: field 'num_steps' must be >= 2, got {num_steps}")
    saved_params = store.data.copy() if store is not None else None
    saved_opt = optimizer.state_dict() if optimizer is not None else None
    ratio = (max_lr / min_lr) ** (1.0 / (num_steps - 1))
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    try:
        for i in range(num_steps):
            lr = min_lr * ratio ** i
            loss = float(step_fn(lr))
            if not math.isfinite(loss):
                diverged = True
                break
            avg = beta * avg + (1 - beta) * loss
            sm = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(sm)
            best = min(best, sm)
            if sm > diverge_factor * best:
                diverged = True
                break
    finally:
        if saved_params is not None:
            store.data[...] = saved_params
            store.zero_grad()
        if saved_opt is not None:
            optimizer.load_state_dict(saved_opt)
    return LRFinderResult(lrs, losses, smoothed, _steepest(lrs, smoothed, skip_start, skip_end), diverged)


def _steepest(lrs: list[float], smoothed: list[float], skip_start: int, skip_end: int) -> float | None:
    lo, hi = skip_start, len(lrs) - skip_end
    if hi - lo < 3:
        return None
    x = np.log(np.asarray(lrs[lo:hi]))
    y = np.asarray(smoothed[lo:hi])
    slope = np.gradient(y, x)
    return float(lrs[lo + int(np.argmin(slope))])


__all__ = ["find_lr", "LRFinderResult"]
