"""DiLoCo's outer step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", Algorithm 1): workers take H inner optimizer steps each from the same parameters theta, then
    outer gradient   Delta = theta - mean_i theta_i        (an all-reduce of theta - theta_i, divided by W)
    outer step       Nesterov momentum SGD on Delta:  m = mu m + Delta;  theta -= lr (Delta + mu m)
(PyTorch's SGD(nesterov=True) form; the paper uses lr 0.7, mu 0.9). One all-reduce every H steps instead of every
step. With H = 1, lr 1 and mu 0 it is synchronous training with plain SGD as the inner optimizer.

Works on the flat parameter buffer (engine ParamStore.data, (P,)), in place. Every rank applies the same outer
step to the same all-reduced sum, so parameters stay bitwise identical across ranks when the sum is (the ring's
deterministic schedule). The state, anchor theta and momentum m, is two plain arrays for checkpoints.

Not yet wired into the training loop (`--sync-every H`): docs/network.md lists what remains.
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
        delta = delta_sum / world_size
        if self.momentum:
            self.buf *= self.momentum
            self.buf += delta
            step = delta + self.momentum * self.buf if self.nesterov else self.buf
        else:
            step = delta
        self.anchor -= self.lr * step
        params[...] = self.anchor

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"anchor": self.anchor.copy(), "momentum": self.buf.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        anchor, buf = np.asarray(state["anchor"]), np.asarray(state["momentum"])
        if anchor.shape != self.anchor.shape or buf.shape != self.buf.shape:
            raise ValueError(f"DiLoCo state: anchor {anchor.shape} / momentum {buf.shape}, expected "
                             f"{self.anchor.shape}")
        self.anchor = anchor.astype(self.anchor.dtype, copy=True)
        self.buf = buf.astype(self.buf.dtype, copy=True)
