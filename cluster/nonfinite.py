"""Non-finite steps: the trainer skips a step whose all-reduced loss or gradient is NaN/Inf (every rank sees the
same reduced values, so every rank skips alike). After run.max_nonfinite in a row every rank re-runs its share of
the offending batch under engine.debug.detect_nonfinite, and the job stops naming the first layer (and rank) that
produced the non-finite value.

    finding = locate_nonfinite(model, store, batch, count, rank)    # {"rank", "layer"?, "what"?}
    raise nonfinite_error(findings, rank, step, in_row, limit, skipped)
    check_finite_params(store, rank, step)                          # at the end: no final checkpoint of NaNs
"""
from __future__ import annotations

import math

import numpy as np

from ndtrain.engine.debug import NonFiniteError, detect_nonfinite, first_nonfinite


class WorkerError(RuntimeError):
    """A failure inside the loop; the message names the rank and step. A run that goes bad (non-finite steps or
    parameters) is the user's to fix, not a bug: one line, no traceback (`one_line`, see RankReporter.error)."""

    one_line = True


def locate_nonfinite(model, store, batch, count: float, rank: int) -> dict:
    """Re-run this rank's share of the offending batch under detect_nonfinite: the first layer (forward output
    or input gradient) holding NaN/Inf, else the first non-finite parameter or the loss itself.
    batch: one batch, or a list of micro-batches (deterministic mode); count: the global target count."""
    module = model.module
    bad = first_nonfinite(store, "data")
    if bad is not None:
        return {"rank": rank, "layer": bad, "what": f"parameter {bad!r} is non-finite"}
    count = count if math.isfinite(count) and count > 0 else 1.0
    micro = batch if isinstance(batch, list) else [batch]
    try:
        with detect_nonfinite(module):
            for mb in micro:
                store.zero_grad()
                loss_sum, _, backward = model.loss(mb, train=True)
                if not math.isfinite(loss_sum):
                    return {"rank": rank, "what": f"the loss (every layer's output finite): {loss_sum}"}
                backward(1.0 / count)
                grad = first_nonfinite(store, "grad")
                if grad is not None:
                    return {"rank": rank, "layer": grad, "what": f"the gradient of parameter {grad!r}"}
    except NonFiniteError as e:
        return {"rank": rank, "layer": e.path, "what": str(e)}
    finally:
        store.zero_grad()
    return {"rank": rank}


def nonfinite_error(findings: list[dict], rank: int, step: int, in_row: int, limit: int, skipped: int) -> WorkerError:
    """The error that stops the job: the first rank whose re-run found a layer (else any finding)."""
    where = [f for f in findings if f.get("layer")] or [f for f in findings if f.get("what")]
    culprit = "; ".join(f"rank {f['rank']}: {f.get('what')}" for f in where[:1]) or "not reproduced on a re-run"
    return WorkerError(f"rank {rank}, step {step}: {in_row} non-finite steps in a row (run.max_nonfinite={limit}, "
                       f"{skipped} skipped in all); first non-finite value: {culprit}. Lower optim.lr, set "
                       f"optim.grad_clip, or check the data")


def check_finite_params(store, rank: int, step: int) -> None:
    """A run must not end (exit 0, a final checkpoint) with NaN/Inf parameters: an update can overflow even when
    every loss and gradient was finite (a huge optim.lr)."""
    if np.isfinite(store.data).all():
        return
    raise WorkerError(f"rank {rank}, step {step}: the parameters are not finite at the end of training (first: "
                      f"{first_nonfinite(store, 'data')!r}); no final checkpoint was written. Lower optim.lr or set "
                      f"optim.grad_clip")
