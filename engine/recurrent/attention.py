"""Attention for RNN encoder-decoders: the decoder state queries the encoder outputs.

    scores (B, T, S) -> softmax over the real source positions -> context = weights @ enc_out  (B, T, H)
    DotAttention       score(q, k) = q . k                           (Luong et al. 2015, "dot")
    AdditiveAttention  score(q, k) = v . tanh(q W_q + k W_k + b)      (Bahdanau et al. 2015)

Both take the query from the decoder RNN's *output* at the same step (Luong's placement, no input feeding), so
teacher-forced training still runs the decoder over all T steps first and attends over all of them at once.

    (context, weights), backward = attn(query, keys, src_mask)
        query (B, T, H); keys (B, S, H) encoder outputs; src_mask (B, S) bool, True at real source tokens
    dquery, dkeys = backward(dcontext, dweights=None)
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..layers import Linear
from ..module import Module
from ..params import Param
from .. import init as initializers


def _masked_softmax(scores: np.ndarray, src_mask: np.ndarray) -> np.ndarray:
    """scores (B, T, S); src_mask (B, S) -> weights (B, T, S), zero on padding (a large finite negative, not -inf:
    a row with no real token gives a uniform average, never NaN)."""
    scores = np.where(src_mask[:, None, :], scores, kernels.MASK_VALUE)
    return kernels.softmax(scores, axis=-1)


class DotAttention(Module):
    def forward(self, query, keys, src_mask, *, train: bool):
        scores = query @ keys.transpose(0, 2, 1)  # (B, T, S)
        w = _masked_softmax(scores, src_mask)
        context = w @ keys  # (B, T, H)

        def backward(dcontext, dweights=None):
            dkeys = w.transpose(0, 2, 1) @ dcontext  # (B, S, H)
            dw = dcontext @ keys.transpose(0, 2, 1)  # (B, T, S)
            if dweights is not None:
                dw += dweights
            dscores = kernels.softmax_backward(w, dw)
            dquery = dscores @ keys
            dkeys += dscores.transpose(0, 2, 1) @ query
            return dquery, dkeys

        return (context, w), backward


class AdditiveAttention(Module):
    """d_attn: width of the tanh layer (Bahdanau's n'). W_q (H, A) without bias, W_k (H, A) with the bias, v (A,)."""

    def __init__(self, hidden_size: int, d_attn: int):
        super().__init__()
        self.W_q = Linear(hidden_size, d_attn, bias=False)
        self.W_k = Linear(hidden_size, d_attn)
        self.v = Param((d_attn,), initializers.torch_linear_default(d_attn), decay=True)

    def forward(self, query, keys, src_mask, *, train: bool):
        q, bq = self.W_q(query, train=train)  # (B, T, A)
        k, bk = self.W_k(keys, train=train)  # (B, S, A)
        e = np.tanh(q[:, :, None, :] + k[:, None, :, :])  # (B, T, S, A)
        v = self.v
        scores = e @ v.data  # (B, T, S)
        w = _masked_softmax(scores, src_mask)
        context = w @ keys

        def backward(dcontext, dweights=None):
            dkeys = w.transpose(0, 2, 1) @ dcontext  # (B, S, H)
            dw = dcontext @ keys.transpose(0, 2, 1)  # (B, T, S)
            if dweights is not None:
                dw += dweights
            dscores = kernels.softmax_backward(w, dw)  # (B, T, S)
            A = e.shape[-1]
            v.grad += dscores.reshape(-1) @ e.reshape(-1, A)
            dpre = dscores[..., None] * v.data  # (B, T, S, A)
            dpre *= 1.0 - e * e
            dquery = bq(dpre.sum(axis=2))
            dkeys += bk(dpre.sum(axis=1))
            return dquery, dkeys

        return (context, w), backward
