"""Inverted dropout (Srivastava et al. 2014): x (...) -> (...)."""
from __future__ import annotations

import numpy as np

from ..module import Module


class Dropout(Module):
    """Train: zero each element with probability p and scale the rest by 1/(1-p), so the expectation is unchanged
    and eval is the identity. Identity also when p == 0. x: (...) -> (...).

    Randomness comes from `self.rng` (np.random.Generator); engine.module.seed_rngs reseeds it per module so runs
    repeat. The scaled mask lives in the closure: backward is dx = dy * mask.
    """

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(0)

    def forward(self, x, *, train: bool):
        p = self.p
        if not train or p == 0.0:
            return x, lambda dy: dy
        if p == 1.0:
            return np.zeros_like(x), lambda dy: np.zeros_like(dy)
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        u = self.rng.random(x.shape, dtype=dtype)  # U[0, 1): P(u < p) = p exactly drops
        mask = np.multiply(u >= p, 1.0 / (1.0 - p), out=u, dtype=dtype)  # reuse u: 0 or 1/(1-p)
        y = x * mask

        return y, lambda dy: dy * mask
