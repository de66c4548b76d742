"""Embedding: a lookup table of learned vectors, ids (...) int -> (..., d)."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param


class Embedding(Module):
    """ids: (...) integer in [0, n) -> W[ids]: (..., d).

    Init N(0, 1), PyTorch's nn.Embedding default (GPT-2 style models pass w_init=init.normal(0.02)); the row
    `padding_idx` starts at zero and never receives a gradient, so it stays zero (PyTorch's semantics).
    decay=False: weight decay on rarely seen rows would shrink them between their updates.
    The backward scatter-adds rows (kernels.embedding_backward: sorted ids and a sparse product, not np.add.at) and
    returns None: there is no gradient for integer ids.
    """

    def __init__(self, n: int, d: int, padding_idx: int | None = None, w_init=None):
        super().__init__()
        self.n, self.d = n, d
        if padding_idx is not None:
            if not -n <= padding_idx < n:
                raise ValueError(f"Embedding: padding_idx {padding_idx} outside [0, {n})")
            padding_idx %= n
        self.padding_idx = padding_idx
        base = w_init or initializers.normal(1.0)

        def init(rng, shape, dtype):
            w = base(rng, shape, dtype)
            if padding_idx is not None:
                w[padding_idx] = 0
            return w

        self.W = Param((n, d), init, decay=False)

    def forward(self, ids, *, train: bool):
        W, padding_idx = self.W, self.padding_idx
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"Embedding {self.path or ''}: ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            bad = ids[(ids < 0) | (ids >= self.n)].reshape(-1)[0]
            raise IndexError(f"Embedding {self.path or ''}: id {bad} outside [0, {self.n})")
        y = np.take(W.data, ids, axis=0)  # (..., d); np.take is faster than W.data[ids]

        def backward(dy):
            kernels.embedding_backward(W.grad, ids, dy, padding_idx)
            return None

        return y, backward
