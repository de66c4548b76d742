"""DecoderLM: a GPT-style decoder-only language model (causal self-attention, tied input/output embeddings)."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..attention import make_attention_mask
from ..cross_entropy import linear_cross_entropy
from ..module import Module
from ..params import Param
from .config import DecoderLMConfig
from .seq2seq import reorder_state
from .stacks import Decoder, InputEmbedding, padding_mask


class DecoderLM(Module):
    """forward(x (B, T) int) -> logits (B, T, V); backward(dlogits) -> None. IncrementalDecoder with a KV cache."""

    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = InputEmbedding(cfg, cfg.vocab_size)
        self.decoder = Decoder(cfg, cfg.n_layers, cross=False)
        if not cfg.tie_embeddings:
            self.w_out = Param((cfg.d_model, cfg.vocab_size), initializers.normal(0.02))

    def _head(self, h):
        if self.cfg.tie_embeddings:
            return self.embed.tokens.logits(h)
        B, T, D = h.shape
        h2 = h.reshape(B * T, D)

        def backward(dlogits):
            dl2 = dlogits.reshape(B * T, -1)
            self.w_out.grad += h2.T @ dl2
            return (dl2 @ self.w_out.data.T).reshape(B, T, D)

        return (h2 @ self.w_out.data).reshape(B, T, -1), backward

    def _logits(self, h):
        """Inference head: h (..., D) -> logits (..., V), nothing kept."""
        W = self.embed.tokens.weight.data.T if self.cfg.tie_embeddings else self.w_out.data
        return (h.reshape(-1, h.shape[-1]) @ W).reshape(*h.shape[:-1], -1)  # one 2-D GEMM

    def _head_params(self):
        """The output layer as linear_cross_entropy takes it: weight (V, D) and its grad."""
        w = self.embed.tokens.weight if self.cfg.tie_embeddings else None
        return (w.data, w.grad) if w is not None else (self.w_out.data.T, self.w_out.grad.T)

    def hidden(self, x, *, record: dict | None = None, train: bool):
        """x (B, T) -> the last hidden states h (B, T, D) and backward(dh) -> None (None for train=False)."""
        T = x.shape[1]
        mask = make_attention_mask(padding_mask(x, self.cfg.pad_id), causal=True, tq=T, tk=T, dtype=self.dtype)
        h, emb_backward = self.embed(x, train=train)
        h, dec_backward = self.decoder(h, self_mask=mask, record=record, train=train)
        if not train:
            return h, None  # forward only: nothing kept

        def backward(dh):
            emb_backward(dec_backward(dh)[0])
            return None

        return h, backward

    def forward(self, x, *, record: dict | None = None, train: bool):
        """train=False: forward only, returns (logits, None)."""
        h, hidden_backward = self.hidden(x, record=record, train=train)
        if not train:
            return self._logits(h), None
        logits, head_backward = self._head(h)

        def backward(dlogits):
            return hidden_backward(head_backward(dlogits))

        return logits, backward

    def loss(self, x, y, *, ignore_index: int | None = None, label_smoothing: float = 0.0, gather: bool = True,
             record: dict | None = None, train: bool):
        """Next-token cross-entropy SUM over the real positions of y (y != ignore_index, default cfg.pad_id); the
        output projection and softmax run on those rows only when y has padding (gather=False: every row).
        Returns (loss_sum, count, backward(scale)); tied embeddings get both their gradients."""
        h, hidden_backward = self.hidden(x, record=record, train=train)  # (B, T, D)
        weight, dweight = self._head_params()
        ignore = self.cfg.pad_id if ignore_index is None else ignore_index
        loss_sum, count, head_backward = linear_cross_entropy(h, weight, np.asarray(y), dweight=dweight,
                                                              ignore_index=ignore, label_smoothing=label_smoothing,
                                                              gather=gather)

        def backward(scale: float) -> None:
            hidden_backward(head_backward(scale))

        return loss_sum, count, backward

    # -- IncrementalDecoder -------------------------------------------------------------------------------------------
    def start(self, src=None, batch_size: int | None = None) -> dict:
        if batch_size is None:
            raise ValueError("DecoderLM.start: batch_size is required (a language model has no source)")
        return {"caches": [{} for _ in self.decoder.layers], "self_pad": np.zeros((batch_size, 0), dtype=bool),
                "pos": 0}

    def step(self, tokens, state: dict):
        tokens = np.asarray(tokens)
        offset, t = state["pos"], tokens.shape[1]
        self_pad = np.concatenate([state["self_pad"], tokens == self.cfg.pad_id], axis=1)
        mask = make_attention_mask(self_pad if self_pad.any() else None, causal=True, tq=t, tk=offset + t,
                                   q_offset=offset, dtype=self.dtype)
        x, _ = self.embed(tokens, offset, train=False)
        h, caches = self.decoder.step(x, state["caches"], mask)
        logits = self._logits(h[:, -1])  # (B, V)
        return logits, {"caches": caches, "self_pad": self_pad, "pos": offset + t}

    def reorder(self, state: dict, idx) -> dict:
        return reorder_state(state, np.asarray(idx))
