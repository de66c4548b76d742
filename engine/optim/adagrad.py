"""Adagrad (Duchi et al.), torch.optim.Adagrad semantics:

    g = g + wd * p;  sum += g^2;  p -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(sum) + eps)
"""
from __future__ import annotations

import numpy as np

from .base import Optimizer


class Adagrad(Optimizer):
    state_names = ("sum",)

    def __init__(self, store, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, decay_mask: bool = True):
        if not lr_decay >= 0:
            raise ValueError(f"Adagrad: field 'lr_decay' must be >= 0, got {lr_decay}")
        if not initial_accumulator_value >= 0:
            raise ValueError(f"Adagrad: field 'initial_accumulator_value' must be >= 0, got "
                             f"{initial_accumulator_value}")
        super().__init__(store, lr=lr, weight_decay=weight_decay, decay_mask=decay_mask, n_scratch=2)
        self.lr_decay, self.eps = float(lr_decay), float(eps)
        self.state["sum"].fill(initial_accumulator_value)

    def _block(self, lr, sl, scratch):
        acc = self.state["sum"][sl]
        g = self._grad_with_l2(sl, scratch[0])  # (block,)
        s = scratch[1]
        clr = lr / (1.0 + (self.step_count - 1) * self.lr_decay)
        np.multiply(g, g, out=s)
        acc += s
        np.sqrt(acc, out=s)
        s += self.eps
        np.divide(g, s, out=s)
        s *= clr
        p = self.params[sl]  # a view: `self.params[sl] -= s` would also copy it back onto itself
        p -= s
