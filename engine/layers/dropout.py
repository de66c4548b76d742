"""Inverted dropout (Srivastava et al. 2014): x (...) -> (...)."""
from __future__ import annotations

import numpy as np

from .. import kernels
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
        mask = kernels.dropout_mask(self.rng, x.shape, p, x.dtype)  # 0 or 1/(1-p); the Transformer's too
        y = x * mask

        return y, lambda dy: dy * mask
