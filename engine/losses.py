"""Losses as pure functions returning the loss and its gradient w.r.t. the input (the fused forms).

One contract for every loss (PyTorch semantics for the values):

    loss, grad        = mse(pred, target)                       # reduction="mean" (default)
    loss_sum, grad, n = mse(pred, target, reduction="sum")      # plus the COUNT of real elements

`grad` is d(loss)/d(input) for the returned loss (the mean or the sum), times `grad_scale` (default 1), which is
fused into the pass that writes the gradient. `n` counts the real elements the sum runs over: every element for the
regression losses and BCE, the rows whose target is not `ignore_index` for cross_entropy. The training loop sums
`loss_sum` and `n` over ranks and divides by the global count (see cluster/job.py, TaskModel.loss), so N
workers compute what one worker computes on the whole batch.

When the global count is only known later (TaskModel's `backward(scale)`), `cross_entropy_fused` returns
`(loss_sum, count, grad_fn)`; `grad_fn(scale)` writes the gradient of `scale * loss_sum` in one pass over the
softmax it kept, so the scale costs nothing extra. `cross_entropy` is that function with the scale known at once.

Deviation from PyTorch: a mean over zero real elements (every target ignored) is 0 with a zero gradient, not NaN,
so an all-padding batch cannot poison a run.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .cross_entropy import check_targets, softmax_xent_grad_, softmax_xent_rows

_REDUCTIONS = ("mean", "sum")


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction={reduction!r}; expected one of {_REDUCTIONS}")


def _finish(loss_sum: float, grad: np.ndarray, count: int, reduction: str, grad_scale: float):
    """Scale the gradient of the SUM into that of the requested reduction (in place) and package the result."""
    if reduction == "mean":
        inv = 1.0 / count if count else 0.0
        grad *= grad_scale * inv
        return loss_sum * inv, grad
    if grad_scale != 1.0:
        grad *= grad_scale
    return loss_sum, grad, count


def _check_same_shape(fn: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{fn}: input shape {x.shape} != target shape {y.shape}")


# -- regression ------------------------------------------------------------------------------------------------------
def mse(pred: np.ndarray, target: np.ndarray, *, reduction: str = "mean", grad_scale: float = 1.0):
    """Mean squared error: sum (pred - target)^2. pred, target: same shape (any). Gradient 2 (pred - target)."""
    _check_reduction("mse", reduction)
    _check_same_shape("mse", pred, target)
    d = pred - target
    loss_sum = float(np.dot(d.ravel(), d.ravel())) if d.dtype == np.float64 else float(
        np.sum(np.square(d, dtype=np.float64)))
    d *= 2.0
    return _finish(loss_sum, d, d.size, reduction, grad_scale)


def mae(pred: np.ndarray, target: np.ndarray, *, reduction: str = "mean", grad_scale: float = 1.0):
    """L1 loss: sum |pred - target|. Gradient sign(pred - target) (0 at a tie, as torch)."""
    _check_reduction("mae", reduction)
    _check_same_shape("mae", pred, target)
    d = pred - target
    loss_sum = float(np.abs(d).sum(dtype=np.float64))
    np.sign(d, out=d)
    return _finish(loss_sum, d, d.size, reduction, grad_scale)


def huber(pred: np.ndarray, target: np.ndarray, delta: float = 1.0, *, reduction: str = "mean",
          grad_scale: float = 1.0):
    """torch.nn.HuberLoss: 0.5 d^2 where |d| < delta, else delta (|d| - 0.5 delta); d = pred - target.
    Gradient d inside, delta sign(d) outside: clip(d, -delta, delta)."""
    _check_reduction("huber", reduction)
    _check_same_shape("huber", pred, target)
    if not delta > 0:
        raise ValueError(f"huber: delta must be > 0, got {delta}")
    d = pred - target
    a = np.abs(d)
    quad = a < delta
    per = np.where(quad, 0.5 * d * d, delta * (a - 0.5 * delta))
    loss_sum = float(per.sum(dtype=np.float64))
    np.clip(d, -delta, delta, out=d)
    return _finish(loss_sum, d, d.size, reduction, grad_scale)


# -- classification --------------------------------------------------------------------------------------------------
def bce_with_logits(logits: np.ndarray, target: np.ndarray, *, reduction: str = "mean", grad_scale: float = 1.0):
    """Binary cross-entropy on logits, stable for any |x|: max(x, 0) - x y + log(1 + exp(-|x|)).
    logits, target: same shape, target in [0, 1]. Gradient sigmoid(x) - y."""
    _check_reduction("bce_with_logits", reduction)
    _check_same_shape("bce_with_logits", logits, target)
    x = logits
    per = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
    loss_sum = float(per.sum(dtype=np.float64))
    grad = 0.5 * (1.0 + np.tanh(0.5 * x))  # sigmoid without overflow
    grad -= target
    return _finish(loss_sum, grad.astype(x.dtype, copy=False), x.size, reduction, grad_scale)


def count_real(targets: np.ndarray, ignore_index: int = -100) -> int:
    """How many targets are real (not ignore_index): the count cross_entropy's sum runs over."""
    return int(np.count_nonzero(targets != ignore_index))


def cross_entropy_fused(logits: np.ndarray, targets: np.ndarray, *, ignore_index: int = -100,
                        label_smoothing: float = 0.0, inplace: bool = False
                        ) -> tuple[float, int, Callable[[float], np.ndarray]]:
    """Softmax cross-entropy SUM over real rows, with the gradient deferred.

    logits: (..., K) float; targets: (...) int, in [0, K) or == ignore_index.
    Returns (loss_sum, count, grad_fn): grad_fn(scale) -> dlogits (..., K), the gradient of scale * loss_sum,
    i.e. scale * (softmax - smoothed one-hot) on real rows and 0 on ignored rows. grad_fn may be called once: it
    writes into the buffer that holds the softmax: with inplace=True the logits themselves when they are writeable
    and contiguous (otherwise a copy, silently), saving one (N, K) allocation.

    Label smoothing as torch: the target distribution is (1 - eps) onehot + eps / K, so
    loss_row = lse - (1 - eps) z_t - eps/K sum_k z_k   with z = logits, lse = log sum exp z.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                         f"got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integers, got {targets.dtype}")
    K = logits.shape[-1]
    out_shape = logits.shape
    x = logits.reshape(-1, K)  # (N, K)
    t = targets.reshape(-1)  # (N,)
    valid = t != ignore_index  # (N,)
    count = int(np.count_nonzero(valid))
    check_targets(t, valid, K, "cross_entropy", ignore_index)
    eps = float(label_smoothing)
    # exp(z - max) in cache-sized row blocks (engine/cross_entropy.py), kept in the buffer that becomes the gradient
    e = x if inplace and x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C")  # (N, K)
    s, per = softmax_xent_rows(e, np.where(valid, t, 0), eps)
    loss_sum = float(per[valid].sum())

    def grad_fn(scale: float = 1.0) -> np.ndarray:
        # p - ((1 - eps) onehot + eps / K), zeroed on ignored rows, times scale: block by block, in place
        return softmax_xent_grad_(e, s, t, valid, eps, scale).reshape(out_shape)

    return loss_sum, count, grad_fn


def cross_entropy(logits: np.ndarray, targets: np.ndarray, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", grad_scale: float = 1.0,
                  inplace: bool = False):
    """torch.nn.functional.cross_entropy on logits (..., K) and int targets (...), with its gradient.

    reduction="mean": (loss, dlogits), the mean over real rows (targets != ignore_index);
    reduction="sum":  (loss_sum, dlogits, count). dlogits is times grad_scale; with inplace=True it overwrites the
    logits buffer (saves one (N, K) allocation on (B*T, V) logits).
    """
    _check_reduction("cross_entropy", reduction)
    loss_sum, count, grad_fn = cross_entropy_fused(logits, targets, ignore_index=ignore_index,
                                                   label_smoothing=label_smoothing, inplace=inplace)
    if reduction == "mean":
        inv = 1.0 / count if count else 0.0
        return loss_sum * inv, grad_fn(grad_scale * inv)
    return loss_sum, grad_fn(grad_scale), count


__all__ = ["mse", "mae", "huber", "bce_with_logits", "cross_entropy", "cross_entropy_fused", "count_real"]
