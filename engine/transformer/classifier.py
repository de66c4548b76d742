"""EncoderClassifier: a BERT-style encoder with a pooled head (masked mean or first token -> dense + tanh -> classes)."""
from __future__ import annotations

import numpy as np

from ..attention import make_attention_mask
from ..layers.linear import Linear
from ..module import Module
from .config import EncoderClassifierConfig
from .stacks import Encoder, InputEmbedding, padding_mask


class EncoderClassifier(Module):
    """forward(x (B, T) int) -> logits (B, n_classes); backward(dlogits) -> None."""

    def __init__(self, cfg: EncoderClassifierConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = InputEmbedding(cfg, cfg.vocab_size)
        self.encoder = Encoder(cfg, cfg.n_layers)
        self.pooler = Linear(cfg.d_model, cfg.d_model)
        self.classifier = Linear(cfg.d_model, cfg.n_classes)

    def forward(self, x, *, record: dict | None = None, train: bool):
        B, T = x.shape
        pad = padding_mask(x, self.cfg.pad_id)
        mask = make_attention_mask(pad, dtype=self.dtype) if pad is not None else None
        h, emb_backward = self.embed(x, train=train)
        h, enc_backward = self.encoder(h, mask=mask, record=record, train=train)
        if self.cfg.pooling == "cls":
            pooled = h[:, 0]
        else:
            w = np.ones((B, T), h.dtype) if pad is None else (~pad).astype(h.dtype)
            w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)  # (B, T) weights of the masked mean
            pooled = np.matmul(w[:, None, :], h)[:, 0]  # (B, D)
        z, pool_backward = self.pooler(pooled, train=train)
        t = np.tanh(z)
        logits, cls_backward = self.classifier(t, train=train)
        if not train:
            return logits, None

        def backward(dlogits):
            dt = cls_backward(dlogits)
            dpooled = pool_backward(dt * (1.0 - t * t))  # (B, D)
            if self.cfg.pooling == "cls":
                dh = np.zeros_like(h)
                dh[:, 0] = dpooled
            else:
                dh = w[:, :, None] * dpooled[:, None, :]
            emb_backward(enc_backward(dh))
            return None

        return logits, backward
