"""DiLoCo's outer step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", Algorithm 1): workers take H inner optimizer steps each from the same parameters theta, then
    outer gradient   Delta = theta - mean_i theta_i        (an all-reduce of theta - theta_i, divided by W)
    outer step       Nesterov momentum SGD on Delta:  m = mu m + Delta;  theta -= lr (Delta + mu m)
(PyTorch's SGD(nesterov=True) form; the paper uses lr 0.7, mu 0.9). One all-reduce every H steps instead of every
step. With H = 1, lr 1 and mu 0 it is synchronous training with plain SGD as the inner optimizer.

Works on the flat parameter buffer (engine ParamStore.data, (P,)), in place. Every rank applies the same outer
step to the same all-reduced sum, so parameters stay bitwise identical across ranks when the sum is (the ring's
deterministic schedule). The state, anchor theta and momentum m, is two plain arrays for checkpoints.

The training loop's use of it (`--sync-every H`) is cluster/local_sgd.py.
"""
from __future__ import annotations

import numpy as np


class DiLoCo:
    """params: (P,) the flat parameters at the start (every rank the same); lr, momentum: the outer optimizer."""

    def __init__(self, params: np.ndarray, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"DiLoCo outer optimizer: lr must be > 0 and momentum in [0, 1) (got {lr}, {momentum})")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.anchor = np.array(params, copy=True)          # theta at the last synchronisation, (P,)
        self.buf = np.zeros_like(self.anchor)               # outer momentum m, (P,)

    def outer_gradient(self, params: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """This rank's theta - theta_i: (P,), to be summed over ranks (all-reduce)."""
        return np.subtract(self.anchor, params, out=out)

    def outer_step(self, params: np.ndarray, delta_sum: np.ndarray, world_size: int) -> None:
        """params <- the new anchor, from the sum over ranks of outer_gradient (in place, every rank alike)."""
        self.advance(delta_sum, world_size)
        params[...] = self.anchor

    def advance(self, delta_sum: np.ndarray, world_size: int) -> None:
        """anchor <- the outer Nesterov step on the mean outer gradient delta_sum / W (every rank alike)."""
        self.anchor, self.buf = self._next(delta_sum, world_size)

    def peek(self, delta_sum: np.ndarray, world_size: int) -> np.ndarray:
        """The anchor advance() would give, (P,), with no state changed (evaluation while a sum waits to be applied)."""
        return self._next(delta_sum, world_size)[0]

    def _next(self, delta_sum: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(anchor, momentum) after the outer step on delta_sum / W, as new arrays."""
        delta = delta_sum / world_size
        if not self.momentum:
            return self.anchor - self.lr * delta, self.buf
        buf = self.momentum * self.buf + delta
        step = delta + self.momentum * buf if self.nesterov else buf
        return self.anchor - self.lr * step, buf

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"anchor": self.anchor.copy(), "momentum": self.buf.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        anchor, buf = np.asarray(state["anchor"]), np.asarray(state["momentum"])
        if anchor.shape != self.anchor.shape or buf.shape != self.buf.shape:
            raise ValueError(f"DiLoCo state: anchor {anchor.shape} / momentum {buf.shape}, expected "
                             f"{self.anchor.shape}")
        self.anchor = anchor.astype(self.anchor.dtype, copy=True)
        self.buf = buf.astype(self.buf.dtype, copy=True)


class OverlappedDiLoCo:
    """The outer step applied tau inner steps after its exchange starts (1 <= tau <= H), so the exchange hides behind
    those steps (the delayed outer gradient of Kale, Douillard & Donchev 2025, "Eager Updates For Overlapped
    Communication and Computation in DiLoCo", and the overlap of tau steps of Douillard et al. 2025, "Streaming
    DiLoCo"). Each rank keeps the progress it made while the exchange was in flight, as the eager variant does with
    its own fresh outer gradient, but the correction every rank applies is the same: the anchor moves by the outer
    step on the SUM that arrived, which is bitwise equal everywhere.

    Rank i holds x_i (its parameters) and b_i (its base); A (the anchor) and the outer momentum are shared.
        launch (at each sync):  d_i = b_i - x_i;  b_i <- x_i;  start the exchange of d_i (its sum D over ranks)
        apply (tau steps later): A <- Nesterov(A, D / W);  x_i <- A + (x_i - b_i);  b_i <- A
                                 (the rank's in-flight progress is replaced by the mean; what it did since the
                                  launch is kept; the next launch sends x_i's distance from the anchor)
    tau = H applies at the next sync, just before its launch (`sync`). At the run's end (`finish`) the last exchange
    is launched and applied with no step between: x_i <- A on every rank. The anchor is what evaluation and
    checkpoints' param/ see. Rounds stay H steps long whatever tau: tau only moves where the correction lands, and
    a smaller tau leaves a rank's own share of the round in its parameters for fewer steps."""

    def __init__(self, outer: DiLoCo, params: np.ndarray):
        self.outer = outer
        self.base = np.array(params, copy=True)  # b_i, (P,)

    def launch(self, params: np.ndarray) -> np.ndarray:
        """d_i = b_i - x_i, this rank's outer gradient to exchange now, (P,); b_i <- x_i."""
        d = self.base - params
        self.base[...] = params
        return d

    def apply(self, params: np.ndarray, delta_sum: np.ndarray, world_size: int) -> None:
        """The outer step on the sum D of the exchange launched last, in place on params (x_i <- A + x_i - b_i)."""
        self.outer.advance(delta_sum, world_size)
        params -= self.base
        params += self.outer.anchor
        self.base[...] = self.outer.anchor

    def sync(self, params: np.ndarray, delta_sum: np.ndarray | None, world_size: int) -> np.ndarray:
        """tau = H: apply D (when given), then launch; returns d_i (b_i - x_i as it was before the correction: the
        same value as apply-then-launch, without its rounding)."""
        d = self.base - params
        if delta_sum is not None:
            self.apply(params, delta_sum, world_size)
        self.base[...] = params
        return d

    def finish(self, params: np.ndarray, delta_sum: np.ndarray, world_size: int) -> None:
        """The last exchange's sum, right after it was launched (no inner step since): params <- the anchor."""
        self.apply(params, delta_sum, world_size)
        params[...] = self.outer.anchor  # x_i - b_i was 0: the same bits on every rank
