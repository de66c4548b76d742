"""Encoder and decoder blocks: sub-layers wrapped in residual connections, with the norm placed

    post-LN (Vaswani et al. 2017, the seed's encoder block):  y = Norm(x + Dropout(Sublayer(x)))
    pre-LN  (Xiong et al. 2020, GPT-2):                        y = x + Dropout(Sublayer(Norm(x)))

Residual dropout (rate `dropout`) applies to each sub-layer's output; attention dropout (`attn_dropout`) to the
attention weights.
"""
from __future__ import annotations

import numpy as np

from ..attention import AttentionMask, MultiHeadAttention
from ..kernels import dropout_mask
from ..module import Module
from .ffn import PositionWiseFFN
from .norm import make_norm


def residual(block: Module, x, sublayer, norm: Module, train: bool):
    """One residual sub-layer. sublayer(h) -> (s, backward) where backward(ds) returns dh or (dh, dextra).
    Returns (y, backward(dy) -> (dx, dextra or None)); train=False: (y, None), no dropout, nothing kept."""
    if not train:
        return block._infer(x, lambda h: sublayer(h)[0], norm), None
    p = block.dropout
    if block.pre_norm:
        h, norm_backward = norm(x, train=train)
        s, sub_backward = sublayer(h)
        keep = dropout_mask(block.rng, s.shape, p, s.dtype) if p > 0 else None
        if keep is not None:
            s *= keep
        s += x  # s is a fresh array: reuse it as y

        def backward(dy):
            ds = dy * keep if keep is not None else dy
            dh, extra = _split(sub_backward(ds))
            dx = norm_backward(dh)
            dx += dy
            return dx, extra

        return s, backward

    s, sub_backward = sublayer(x)
    keep = dropout_mask(block.rng, s.shape, p, s.dtype) if p > 0 else None
    if keep is not None:
        s *= keep
    s += x
    y, norm_backward = norm(s, train=train)

    def backward(dy):
        dz = norm_backward(dy)
        dh, extra = _split(sub_backward(dz * keep if keep is not None else dz))
        dh += dz
        return dh, extra

    return y, backward


def _split(g):
    return (g[0], g[1]) if isinstance(g, tuple) else (g, None)


class _Block(Module):
    def __init__(self, d_model, n_heads, d_ff, dropout, attn_dropout, activation, norm, pre_norm, out_init):
        super().__init__()
        self.d_model, self.pre_norm, self.dropout = d_model, pre_norm, float(dropout)
        self.attn_dropout = self.dropout if attn_dropout is None else float(attn_dropout)
        self._mha = lambda cross: MultiHeadAttention(d_model, n_heads, self.attn_dropout, cross=cross,
                                                     out_init=out_init)
        self._ffn = lambda: PositionWiseFFN(d_model, d_ff, activation, out_init=out_init)
        self._norm = lambda: make_norm(norm, d_model)
        self.rng = np.random.default_rng(0)

    def _infer(self, x, sublayer, norm):
        """Inference-only residual sub-layer (no dropout, no backward): sublayer(h) -> s."""
        if self.pre_norm:
            return x + sublayer(norm(x, train=False)[0])
        return norm(x + sublayer(x), train=False)[0]


class EncoderBlock(_Block):
    """x: (B, T, D) -> (B, T, D): self-attention (padding mask) then FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, attn_dropout: float | None = None,
                 activation: str = "gelu", norm: str = "layer", pre_norm: bool = True, out_init=None):
        super().__init__(d_model, n_heads, d_ff, dropout, attn_dropout, activation, norm, pre_norm, out_init)
        self.self_attn = self._mha(False)
        self.ffn = self._ffn()
        self.norm1, self.norm2 = self._norm(), self._norm()

    def forward(self, x, *, mask: AttentionMask | None = None, record: dict | None = None, train: bool):
        h, b1 = residual(self, x, lambda a: self.self_attn(a, mask=mask, record=record, train=train), self.norm1,
                         train)
        y, b2 = residual(self, h, lambda a: self.ffn(a, train=train), self.norm2, train)
        if not train:
            return y, None

        def backward(dy):
            return b1(b2(dy)[0])[0]

        return y, backward


class DecoderBlock(_Block):
    """x: (B, T, D), memory: (B, S, D) -> (B, T, D): masked self-attention, cross-attention over memory, FFN.
    memory=None (cross=False) gives a GPT-style block: masked self-attention and FFN only."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, attn_dropout: float | None = None,
                 activation: str = "gelu", norm: str = "layer", pre_norm: bool = True, cross: bool = True,
                 out_init=None):
        super().__init__(d_model, n_heads, d_ff, dropout, attn_dropout, activation, norm, pre_norm, out_init)
        self.has_cross = cross
        self.self_attn = self._mha(False)
        self.norm1 = self._norm()
        if cross:
            self.cross_attn = self._mha(True)
            self.norm2 = self._norm()
        self.ffn = self._ffn()
        self.norm3 = self._norm()

    def forward(self, x, memory=None, *, self_mask: AttentionMask | None = None,
                cross_mask: AttentionMask | None = None, record: dict | None = None, train: bool):
        """backward(dy) -> (dx, dmemory) (dmemory None without cross-attention)."""
        h, b1 = residual(self, x, lambda a: self.self_attn(a, mask=self_mask, record=record, train=train),
                         self.norm1, train)
        b2 = None
        if self.has_cross:
            h, b2 = residual(self, h, lambda a: self.cross_attn(a, memory, mask=cross_mask, record=record,
                                                                train=train), self.norm2, train)
        y, b3 = residual(self, h, lambda a: self.ffn(a, train=train), self.norm3, train)
        if not train:
            return y, None

        def backward(dy):
            dh = b3(dy)[0]
            dmem = None
            if b2 is not None:
                dh, dmem = b2(dh)
            return b1(dh)[0], dmem

        return y, backward

    def step(self, x, cache: dict, self_mask: AttentionMask | None = None,
             cross_mask: AttentionMask | None = None) -> tuple[np.ndarray, dict]:
        """Incremental decoding. cache: {"self": {k, v}, "cross": {k, v}}; returns (y, new cache)."""
        new = {}

        def self_sub(a):
            y, new["self"] = self.self_attn.step(a, cache.get("self", {}), self_mask)
            return y

        h = self._infer(x, self_sub, self.norm1)
        if self.has_cross:
            new["cross"] = cache["cross"]
            h = self._infer(h, lambda a: self.cross_attn.step(a, cache["cross"], cross_mask)[0], self.norm2)
        return self._infer(h, lambda a: self.ffn(a, train=False)[0], self.norm3), new
