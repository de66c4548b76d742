"""Adam (Kingma & Ba) with torch.optim.Adam semantics: weight_decay is L2, added to the gradient.

    g = g + wd * p;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
from __future__ import annotations

import math

import numpy as np

from .base import Optimizer


class Adam(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, store, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_mask: bool = True):
        name = type(self).__name__
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name}: field 'betas[{i}]' must be in [0, 1), got {b}")
        if not eps >= 0:
            raise ValueError(f"{name}: field 'eps' must be >= 0, got {eps}")
        super().__init__(store, lr=lr, weight_decay=weight_decay, decay_mask=decay_mask, n_scratch=2)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def _l2_grad(self, sl: slice, out: np.ndarray) -> np.ndarray:
        return self._grad_with_l2(sl, out)

    def _block(self, lr, sl, scratch):
        b1, b2 = self.betas
        m, v = self.state["exp_avg"][sl], self.state["exp_avg_sq"][sl]
        g = self._l2_grad(sl, scratch[0])  # (block,)
        s = scratch[1]
        # m.lerp_(g, 1 - b1), as torch: m + (1 - b1) (g - m)
        np.subtract(g, m, out=s)
        s *= 1.0 - b1
        m += s
        # v = b2 v + (1 - b2) g^2
        v *= b2
        np.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s
        t = self.step_count
        step_size = lr / (1.0 - b1 ** t)
        # denom = sqrt(v) / sqrt(1 - b2^t) + eps; then p -= step_size * m / denom
        np.sqrt(v, out=s)
        s *= 1.0 / math.sqrt(1.0 - b2 ** t)
        s += self.eps
        np.divide(m, s, out=s)
        s *= step_size
        p = self.params[sl]  # a view: `self.params[sl] -= s` would also copy it back onto itself
        p -= s
