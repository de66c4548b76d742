"""SGD with momentum, dampening, Nesterov and L2 weight decay: torch.optim.SGD semantics.

    d = g + wd * p;  buf = d (first step) or momentum * buf + (1 - dampening) * d;
    d = d + momentum * buf (nesterov) or buf;  p -= lr * d
"""
from __future__ import annotations

import numpy as np

from .base import Optimizer


class SGD(Optimizer):
    def __init__(self, store, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, decay_mask: bool = True):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs field 'momentum' > 0 and field 'dampening' == 0")
        if not momentum >= 0:
            raise ValueError(f"SGD: field 'momentum' must be >= 0, got {momentum}")
        self.state_names = ("momentum_buffer",) if momentum else ()
        super().__init__(store, lr=lr, weight_decay=weight_decay, decay_mask=decay_mask,
                         n_scratch=2 if nesterov else 1)
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), bool(nesterov)

    def _block(self, lr, sl, scratch):
        s = scratch[0]
        d = self._grad_with_l2(sl, s)  # s, or the grad block itself when there is no decay
        if self.momentum:
            buf = self.state["momentum_buffer"][sl]
            if self.step_count == 1:
                buf[...] = d
            else:
                buf *= self.momentum
                if self.dampening:
                    np.multiply(d, 1.0 - self.dampening, out=s)  # d is not needed after this (no nesterov)
                    buf += s
                else:
                    buf += d
            if self.nesterov:
                t = scratch[1]
                np.multiply(buf, self.momentum, out=t)
                t += d  # d + momentum * buf
                d = t
            else:
                d = buf
        np.multiply(d, lr, out=s)
        p = self.params[sl]  # a view: `self.params[sl] -= s` would also copy it back onto itself
        p -= s
