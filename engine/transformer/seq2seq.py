"""Seq2SeqTransformer: the encoder-decoder of Vaswani et al. (2017), with incremental decoding (KV cache)."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..attention import make_attention_mask
from ..cross_entropy import linear_cross_entropy
from ..kernels import add_row_, col_sum
from ..module import Module
from ..params import Param
from .config import Seq2SeqConfig
from .stacks import Decoder, Encoder, InputEmbedding, padding_mask


class Seq2SeqTransformer(Module):
    """forward(src (B, S) int, tgt_in (B, T) int) -> logits (B, T, tgt_vocab); backward(dlogits) -> None.

    Source PAD keys are masked in encoder self-attention and in cross-attention; the decoder's self-attention is
    causal (plus target PAD keys). Implements the IncrementalDecoder protocol (engine/decoding.py)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.src_embed = InputEmbedding(cfg, cfg.src_vocab)
        shared = self.src_embed.tokens if cfg.share_embeddings else None
        self.tgt_embed = InputEmbedding(cfg, cfg.tgt_vocab, tokens=shared)
        self.encoder = Encoder(cfg, cfg.n_enc_layers)
        self.decoder = Decoder(cfg, cfg.n_dec_layers, cross=True)
        if not cfg.tie_output:
            self.w_out = Param((cfg.d_model, cfg.tgt_vocab), initializers.torch_linear_default(cfg.d_model))
            self.b_out = Param((cfg.tgt_vocab,), initializers.torch_linear_default(cfg.d_model), decay=False)

    # -- pieces ---------------------------------------------------------------------------------------------------------
    def encode(self, src, *, record=None, train: bool):
        """src (B, S) -> memory (B, S, D), the cross-attention mask, backward(dmemory)."""
        src_pad = padding_mask(src, self.cfg.pad_id)
        mask = make_attention_mask(src_pad, dtype=self.dtype) if src_pad is not None else None
        x, emb_backward = self.src_embed(src, train=train)
        memory, enc_backward = self.encoder(x, mask=mask, record=record, train=train)
        if not train:
            return memory, mask, None

        def backward(dmemory):
            emb_backward(enc_backward(dmemory))

        return memory, mask, backward

    def _head(self, h):
        """h (B, T, D) -> logits (B, T, V) and backward(dlogits) -> dh."""
        if self.cfg.tie_output:
            return self.tgt_embed.tokens.logits(h)
        B, T, D = h.shape
        h2 = h.reshape(B * T, D)
        y = h2 @ self.w_out.data
        add_row_(y, self.b_out.data)

        def backward(dlogits):
            dl2 = dlogits.reshape(B * T, -1)
            self.w_out.grad += h2.T @ dl2
            self.b_out.grad += col_sum(dl2)
            return (dl2 @ self.w_out.data.T).reshape(B, T, D)

        return y.reshape(B, T, -1), backward

    def _logits(self, h):
        """Inference head: h (B, T, D) -> logits (B, T, V), nothing kept."""
        h2 = h.reshape(-1, h.shape[-1])  # one 2-D GEMM
        if self.cfg.tie_output:
            return (h2 @ self.tgt_embed.tokens.weight.data.T).reshape(*h.shape[:-1], -1)
        y = h2 @ self.w_out.data
        add_row_(y, self.b_out.data)
        return y.reshape(*h.shape[:-1], -1)

    def _head_params(self):
        """The output layer as linear_cross_entropy takes it: weight (V, D), its grad, bias and its grad (or None)."""
        if self.cfg.tie_output:
            w = self.tgt_embed.tokens.weight
            return w.data, w.grad, None, None
        return self.w_out.data.T, self.w_out.grad.T, self.b_out.data, self.b_out.grad

    # -- training ---------------------------------------------------------------------------------------------------------
    def hidden(self, src, tgt_in, *, record: dict | None = None, train: bool):
        """src (B, S), tgt_in (B, T) -> the decoder's last hidden states h (B, T, D) and backward(dh) -> None
        (None for train=False)."""
        memory, cross_mask, enc_backward = self.encode(src, record=record, train=train)
        T = tgt_in.shape[1]
        self_mask = make_attention_mask(padding_mask(tgt_in, self.cfg.pad_id), causal=True, tq=T, tk=T,
                                        dtype=self.dtype)
        x, emb_backward = self.tgt_embed(tgt_in, train=train)
        h, dec_backward = self.decoder(x, memory, self_mask=self_mask, cross_mask=cross_mask, record=record,
                                       train=train)
        if not train:
            return h, None  # forward only: nothing kept

        def backward(dh):
            dx, dmemory = dec_backward(dh)
            emb_backward(dx)
            enc_backward(dmemory)
            return None

        return h, backward

    def forward(self, src, tgt_in, *, record: dict | None = None, train: bool):
        """train=False: forward only, returns (logits, None); no layer keeps anything for a backward."""
        h, hidden_backward = self.hidden(src, tgt_in, record=record, train=train)
        if not train:
            return self._logits(h), None
        logits, head_backward = self._head(h)

        def backward(dlogits):
            return hidden_backward(head_backward(dlogits))

        return logits, backward

    def loss(self, src, tgt_in, tgt_out, *, ignore_index: int | None = None, label_smoothing: float = 0.0,
             gather: bool = True, record: dict | None = None, train: bool):
        """Teacher-forced cross-entropy SUM over the real target positions (tgt_out != ignore_index, default
        cfg.pad_id), the output projection and softmax computed on those rows only (gathered before the output GEMM;
        gather=False: on every row, the reference). Returns (loss_sum, count, backward(scale)): backward accumulates
        the gradient of scale * loss_sum into every parameter (a tied output layer into the shared embedding)."""
        h, hidden_backward = self.hidden(src, tgt_in, record=record, train=train)  # (B, T, D)
        weight, dweight, bias, dbias = self._head_params()
        ignore = self.cfg.pad_id if ignore_index is None else ignore_index
        loss_sum, count, head_backward = linear_cross_entropy(h, weight, np.asarray(tgt_out), bias=bias,
                                                              dweight=dweight, dbias=dbias, ignore_index=ignore,
                                                              label_smoothing=label_smoothing, gather=gather)

        def backward(scale: float) -> None:
            hidden_backward(head_backward(scale))

        return loss_sum, count, backward

    # -- IncrementalDecoder -------------------------------------------------------------------------------------------
    def start(self, src, batch_size: int | None = None) -> dict:
        memory, cross_mask, _ = self.encode(np.asarray(src), train=False)
        caches = [{"cross": dict(zip(("k", "v"), layer.cross_attn.project_kv(memory)))}
                  for layer in self.decoder.layers]
        B = memory.shape[0]
        return {"caches": caches, "cross_mask": cross_mask, "self_pad": np.zeros((B, 0), dtype=bool), "pos": 0}

    def step(self, tokens, state: dict):
        tokens = np.asarray(tokens)
        offset, t = state["pos"], tokens.shape[1]
        self_pad = np.concatenate([state["self_pad"], tokens == self.cfg.pad_id], axis=1)
        self_mask = make_attention_mask(self_pad if self_pad.any() else None, causal=True, tq=t, tk=offset + t,
                                        q_offset=offset, dtype=self.dtype)
        x, _ = self.tgt_embed(tokens, offset, train=False)
        h, caches = self.decoder.step(x, state["caches"], self_mask, state["cross_mask"])
        logits = self._logits(h[:, -1])  # (B, V)
        return logits, {"caches": caches, "cross_mask": state["cross_mask"], "self_pad": self_pad,
                              "pos": offset + t}

    def reorder(self, state: dict, idx) -> dict:
        return reorder_state(state, np.asarray(idx))

    def reorder_same_source(self, state: dict, idx) -> dict:
        """reorder() for an idx that maps every row to a row of the same source sentence (beam search moving
        hypotheses among one sentence's beams): the source side (cross-attention K/V, its mask) is the same in both
        rows, so it is kept as it is instead of copied; only the target side (self-attention K/V) is selected."""
        return reorder_state(state, np.asarray(idx), keep=("cross", "cross_mask"))


def reorder_state(state: dict, idx: np.ndarray, keep: tuple = ()) -> dict:
    """Select batch rows idx of every cache array (beam search keeps / repeats hypotheses); entries named in keep
    (at any depth) are left as they are."""
    def pick(c):
        if isinstance(c, dict):
            return {k: (v if k in keep else pick(v)) for k, v in c.items()}
        if isinstance(c, list):
            return [pick(v) for v in c]
        if isinstance(c, np.ndarray):
            return c[idx]
        if c is None:
            return None
        return c.select(idx)  # AttentionMask

    return {k: (v if k == "pos" or k in keep else pick(v)) for k, v in state.items()}
