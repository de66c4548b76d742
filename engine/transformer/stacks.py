"""Input embedding (tokens + positions + dropout) and the encoder / decoder stacks shared by the models."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..attention import AttentionMask
from ..kernels import dropout_mask
from ..module import Module, ModuleList
from .blocks import DecoderBlock, EncoderBlock
from .config import TransformerConfig
from .embedding import TokenEmbedding
from .norm import make_norm
from .positional import make_positional


def residual_out_init(cfg: TransformerConfig, n_layers: int):
    """GPT-2: projections writing into the residual stream get std 0.02 / sqrt(2 n_layers) (pre-LN only)."""
    return initializers.scaled_residual(n_layers) if cfg.pre_norm else None


class InputEmbedding(Module):
    """ids (B, T) -> Dropout(TokenEmbedding(ids) + P[offset:offset+T]) (B, T, D)."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int, tokens: TokenEmbedding | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.tokens = tokens if tokens is not None else TokenEmbedding(vocab_size, cfg.d_model, cfg.scale_embedding)
        self.pos = make_positional(cfg.positional, cfg.max_len, cfg.d_model)
        self.rng = np.random.default_rng(0)

    def forward(self, ids, offset: int = 0, *, train: bool):
        x, tok_backward = self.tokens(ids, train=train)
        p, pos_backward = self.pos(ids.shape[1], offset, dtype=x.dtype, train=train)
        x += p
        if not train:
            return x, None
        keep = dropout_mask(self.rng, x.shape, self.dropout, x.dtype) if train and self.dropout > 0 else None
        if keep is not None:
            x *= keep

        def backward(dx):
            if keep is not None:
                dx = dx * keep
            pos_backward(dx.sum(axis=0))
            tok_backward(dx)
            return None

        return x, backward


class Encoder(Module):
    """x (B, S, D) -> memory (B, S, D): n_layers EncoderBlocks, then a final norm for pre-LN."""

    def __init__(self, cfg: TransformerConfig, n_layers: int):
        super().__init__()
        out_init = residual_out_init(cfg, n_layers)
        self.layers = ModuleList(EncoderBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.attn_dropout,
                                              cfg.activation, cfg.norm, cfg.pre_norm, out_init)
                                 for _ in range(n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model) if cfg.pre_norm else None

    def forward(self, x, *, mask: AttentionMask | None = None, record: dict | None = None, train: bool):
        backwards = []
        for layer in self.layers:
            x, b = layer(x, mask=mask, record=record, train=train)
            backwards.append(b)
        if self.final_norm is not None:
            x, b = self.final_norm(x, train=train)
            backwards.append(b)
        if not train:
            return x, None

        def backward(dy):
            for b in reversed(backwards):
                dy = b(dy)
            return dy

        return x, backward


class Decoder(Module):
    """x (B, T, D) [, memory (B, S, D)] -> (B, T, D): n_layers DecoderBlocks, then a final norm for pre-LN.
    backward(dy) -> (dx, dmemory summed over layers, or None)."""

    def __init__(self, cfg: TransformerConfig, n_layers: int, cross: bool):
        super().__init__()
        out_init = residual_out_init(cfg, n_layers)
        self.layers = ModuleList(DecoderBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.attn_dropout,
                                              cfg.activation, cfg.norm, cfg.pre_norm, cross, out_init)
                                 for _ in range(n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model) if cfg.pre_norm else None

    def forward(self, x, memory=None, *, self_mask=None, cross_mask=None, record=None, train: bool):
        backwards = []
        for layer in self.layers:
            x, b = layer(x, memory, self_mask=self_mask, cross_mask=cross_mask, record=record, train=train)
            backwards.append(b)
        norm_backward = None
        if self.final_norm is not None:
            x, norm_backward = self.final_norm(x, train=train)
        if not train:
            return x, None

        def backward(dy):
            if norm_backward is not None:
                dy = norm_backward(dy)
            dmem = None
            for b in reversed(backwards):
                dy, dm = b(dy)
                if dm is not None:
                    if dmem is None:
                        dmem = dm
                    else:
                        dmem += dm
            return dy, dmem

        return x, backward

    def step(self, x, caches: list, self_mask=None, cross_mask=None):
        """Incremental decoding over all layers: returns (y (B, t, D), new caches)."""
        new = []
        for layer, cache in zip(self.layers, caches):
            x, c = layer.step(x, cache, self_mask, cross_mask)
            new.append(c)
        if self.final_norm is not None:
            x = self.final_norm(x, train=False)[0]
        return x, new


def padding_mask(ids: np.ndarray, pad_id: int) -> np.ndarray | None:
    """(B, T) bool True at PAD, or None when the batch has no PAD (then no mask work at all)."""
    pad = ids == pad_id
    return pad if pad.any() else None
