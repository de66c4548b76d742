"""Positional information: sinusoidal encodings (Vaswani et al. 3.5) or learned embeddings (GPT, BERT).

Both are called with a length T and an offset (the first absolute position: > 0 when decoding incrementally) and
return a (T, D) table that the model adds to its token embeddings (broadcast over the batch)."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..module import Module
from ..params import Param


def _check(path, offset, T, max_len):
    if offset + T > max_len:
        raise ValueError(f"{path or 'positional'}: positions {offset}..{offset + T - 1} exceed max_len {max_len}")


class LearnedPositionalEmbedding(Module):
    """weight: (max_len, D), N(0, 0.02^2), no weight decay."""

    def __init__(self, max_len: int, d_model: int, std: float = 0.02):
        super().__init__()
        self.max_len, self.d_model = max_len, d_model
        self.weight = Param((max_len, d_model), initializers.normal(std), decay=False)

    def forward(self, T: int, offset: int = 0, *, dtype=None, train: bool):
        _check(self.path, offset, T, self.max_len)
        W = self.weight
        if not train:
            return W.data[offset:offset + T], None

        def backward(dpos):
            """dpos: (T, D), already summed over the batch."""
            W.grad[offset:offset + T] += dpos
            return None

        return W.data[offset:offset + T], backward


class SinusoidalPositionalEncoding(Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(same). No parameters."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len, self.d_model = max_len, d_model
        pos = np.arange(max_len)[:, None]
        inv = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)
        table = np.zeros((max_len, d_model))
        table[:, 0::2] = np.sin(pos * inv)
        table[:, 1::2] = np.cos(pos * inv)[:, : d_model // 2]
        self.table = table  # float64; cast copies per dtype are cached
        self._cast: dict = {}

    def forward(self, T: int, offset: int = 0, *, dtype=np.float32, train: bool):
        _check(self.path, offset, T, self.max_len)
        dtype = np.dtype(dtype)
        if dtype not in self._cast:
            self._cast[dtype] = self.table.astype(dtype)
        return self._cast[dtype][offset:offset + T], ((lambda dpos: None) if train else None)


def make_positional(kind: str, max_len: int, d_model: int) -> Module:
    if kind == "learned":
        return LearnedPositionalEmbedding(max_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(max_len, d_model)
    raise ValueError(f"positional: unknown kind {kind!r} (expected 'learned' or 'sinusoidal')")
