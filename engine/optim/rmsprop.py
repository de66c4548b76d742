"""RMSprop (Hinton's lecture 6e), torch.optim.RMSprop semantics:

    g = g + wd * p;  sq = alpha sq + (1 - alpha) g^2
    centered: ga += (1 - alpha) (g - ga);  avg = sqrt(sq - ga^2) + eps   else avg = sqrt(sq) + eps
    momentum: buf = momentum buf + g / avg;  p -= lr buf        else p -= lr g / avg
"""
from __future__ import annotations

import numpy as np

from .base import Optimizer


class RMSprop(Optimizer):
    def __init__(self, store, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, decay_mask: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"RMSprop: field 'alpha' must be in [0, 1], got {alpha}")
        if not momentum >= 0:
            raise ValueError(f"RMSprop: field 'momentum' must be >= 0, got {momentum}")
        self.state_names = ("square_avg",) + (("momentum_buffer",) if momentum else ()) + (
            ("grad_avg",) if centered else ())
        super().__init__(store, lr=lr, weight_decay=weight_decay, decay_mask=decay_mask, n_scratch=3)
        self.alpha, self.eps, self.momentum, self.centered = float(alpha), float(eps), float(momentum), centered

    def _block(self, lr, sl, scratch):
        a = self.alpha
        sq = self.state["square_avg"][sl]
        g = self._grad_with_l2(sl, scratch[0])  # (block,)
        s, avg = scratch[1], scratch[2]
        sq *= a
        np.multiply(g, g, out=s)
        s *= 1.0 - a
        sq += s
        if self.centered:
            ga = self.state["grad_avg"][sl]
            np.subtract(g, ga, out=s)
            s *= 1.0 - a
            ga += s
            np.multiply(ga, ga, out=avg)
            np.subtract(sq, avg, out=avg)
            np.sqrt(avg, out=avg)
        else:
            np.sqrt(sq, out=avg)
        avg += self.eps
        np.divide(g, avg, out=s)  # g / avg
        if self.momentum:
            buf = self.state["momentum_buffer"][sl]
            buf *= self.momentum
            buf += s
            np.multiply(buf, lr, out=s)
        else:
            s *= lr
        p = self.params[sl]  # a view: `self.params[sl] -= s` would also copy it back onto itself
        p -= s
