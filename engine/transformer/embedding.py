"""Token embedding, optionally scaled by sqrt(d_model) (Vaswani et al. 3.4), usable as the tied output projection."""
from __future__ import annotations

import math

import numpy as np

from .. import init as initializers
from ..kernels import embedding_backward
from ..module import Module
from ..params import Param


class TokenEmbedding(Module):
    """ids: (B, T) int -> (B, T, D) = weight[ids] * (sqrt(D) if scale else 1). weight: (V, D), N(0, std^2).

    logits(h) is the tied output projection h @ weight^T (Press & Wolf 2017): its gradient accumulates into the
    same Param, so the tied pair is one segment of the flat buffer."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = False, std: float = 0.02):
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.weight = Param((vocab_size, d_model), initializers.normal(std), decay=False)

    def forward(self, ids, *, train: bool):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise IndexError(f"{self.path or 'TokenEmbedding'}: token id out of range [0, {self.vocab_size}): "
                             f"min {ids.min()}, max {ids.max()}")
        W = self.weight
        y = W.data[ids]  # (B, T, D) gather = copy
        if self.scale != 1.0:
            y *= np.asarray(self.scale, y.dtype)
        if not train:
            return y, None

        def backward(dy):
            # sorted ids and a sparse product (kernels.embedding_backward), the sqrt(D) scale folded into it
            embedding_backward(W.grad, ids, dy, scale=self.scale)
            return None  # ids have no gradient

        return y, backward

    def logits(self, h):
        """h: (..., D) -> (..., V) = h @ weight^T; backward(dlogits) -> dh."""
        W = self.weight
        h2 = h.reshape(-1, self.d_model)
        y = h2 @ W.data.T

        def backward(dlogits):
            dl2 = dlogits.reshape(-1, self.vocab_size)
            W.grad += dl2.T @ h2
            return (dl2 @ W.data).reshape(h.shape)

        return y.reshape(*h.shape[:-1], self.vocab_size), backward
