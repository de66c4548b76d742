"""FeatureTokenClassifier: vector classification with a Transformer encoder (FT-Transformer, Gorishniy et al.,
2021): each of the F float features becomes a token, the tokens pass the encoder, their mean goes to a Linear head."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..layers.linear import Linear
from ..module import Module
from ..params import Param
from .stacks import Encoder


class FeatureTokenClassifier(Module):
    """Vector classification with a Transformer encoder: each of the F features becomes a token
    e_j = x_j w_j + b_j (the "feature tokenizer" of Gorishniy et al., 2021, FT-Transformer), the tokens pass the
    engine's Encoder (no mask, no positions: the per-feature embeddings already tell the features apart), their mean
    goes through a Linear head. forward(x (B, F) float) -> (logits (B, C), backward(dlogits) -> dx (B, F)); with
    train=False the backward is None."""

    def __init__(self, cfg, n_features: int, n_classes: int):
        super().__init__()
        self.cfg = cfg.validate()
        D = cfg.d_model
        self.w_feat = Param((n_features, D), initializers.torch_linear_default(D), decay=True)
        self.b_feat = Param((n_features, D), initializers.torch_linear_default(D), decay=False)
        self.encoder = Encoder(cfg, cfg.n_layers)
        self.head = Linear(D, n_classes)

    def forward(self, x, *, train: bool):
        w, b = self.w_feat, self.b_feat
        tokens = x[:, :, None] * w.data + b.data  # (B, F, D)
        h, enc_backward = self.encoder(tokens, train=train)  # (B, F, D)
        F = h.shape[1]
        logits, head_backward = self.head(h.mean(axis=1), train=train)  # (B, C)
        if not train:
            return logits, None  # forward-only: nothing kept for a backward

        def backward(dlogits):
            dpooled = head_backward(dlogits)  # (B, D)
            dh = np.broadcast_to(dpooled[:, None, :] / F, h.shape).copy()  # the mean spreads evenly
            dtokens = enc_backward(dh)  # (B, F, D)
            w.grad += np.einsum("bf,bfd->fd", x, dtokens)
            b.grad += dtokens.sum(axis=0)
            return (dtokens * w.data).sum(axis=-1)  # (B, F)

        return logits, backward
