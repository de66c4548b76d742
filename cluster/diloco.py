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
        delta = delta_sum / world_size
        if self.momentum:
            self.buf *= self.momentum
            self.buf += delta
            step = delta + self.momentum * self.buf if self.nesterov else self.buf
        else:
            step = delta
        self.anchor -= self.lr * step

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
    """The outer step applied one round late, so its exchange hides behind the next H inner steps (the delayed outer
    gradient of Kale, Douillard & Donchev 2025, "Eager Updates For Overlapped Communication and Computation in
    DiLoCo", and the overlapped sync of Douillard et al. 2025, "Streaming DiLoCo"). Each rank keeps the progress it
    made while the exchange was in flight, as the eager variant does with its own fresh outer gradient, but the
    correction every rank applies is the same: the anchor moves by the outer step on the SUM that arrived, which is
    bitwise equal everywhere.

    Rank i holds x_i (its parameters) and b_i (x_i when it last launched an exchange); A (the anchor) and the outer
    momentum are shared. At each sync, with D the sum over ranks of the exchange launched at the previous sync
    (None at the first):
        d_i = b_i - x_i                    this round's outer gradient (minus the progress since the last launch)
        if D: A <- Nesterov(A, D / W);  x_i <- A - d_i     (the rank's in-flight progress is replaced by the mean;
                                                             the progress since the launch is kept)
        b_i <- x_i;  launch the exchange of d_i
    At the run's end (finish) the last exchange is waited for and applied with nothing after it: x_i <- A on every
    rank. The anchor is what evaluation and checkpoints' param/ see. With no progress kept (x_i <- A at each sync)
    this would be the paper's naive delayed update; keeping it lets a rank build on its own last round at once."""

    def __init__(self, outer: DiLoCo, params: np.ndarray):
        self.outer = outer
        self.base = np.array(params, copy=True)  # b_i, (P,)

    def sync(self, params: np.ndarray, delta_sum: np.ndarray | None, world_size: int) -> np.ndarray:
        """Apply D (when given), in place on params; returns d_i, this rank's outer gradient to exchange now."""
        d = self.base - params
        if delta_sum is not None:
            self.outer.advance(delta_sum, world_size)
            np.subtract(self.outer.anchor, d, out=params)
        self.base[...] = params
        return d

    def finish(self, params: np.ndarray, delta_sum: np.ndarray, world_size: int) -> None:
        """The last exchange's sum, right after it was launched (no inner step since): params <- the anchor."""
        self.outer.advance(delta_sum, world_size)
        params[...] = self.outer.anchor
        self.base[...] = params
