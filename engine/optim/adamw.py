"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, p *= 1 - lr * wd, applied before the Adam update
(torch.optim.AdamW order) and only where store.decay_mask() is True."""
from __future__ import annotations

from .adam import Adam


class AdamW(Adam):
    def __init__(self, store, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay_mask: bool = True):
        super().__init__(store, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_mask=decay_mask)

    def _l2_grad(self, sl, out):
        return self.grads[sl]  # no L2: the decay is decoupled

    def _block(self, lr, sl, scratch):
        self._decoupled_decay(lr * self.weight_decay, sl, scratch[1])
        super()._block(lr, sl, scratch)
