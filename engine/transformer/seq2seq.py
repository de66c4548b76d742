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
        h, dec_backward = self.decode_hidden(memory, cross_mask, tgt_in, record=record, train=train)
        if not train:
            return h, None  # forward only: nothing kept

        def backward(dh):
            enc_backward(dec_backward(dh))
            return None

        return h, backward

    def decode_hidden(self, memory, cross_mask, tgt_in, *, record: dict | None = None, train: bool):
        """The decoder over an encoded source: memory (B, S, D) and its cross-attention mask (from encode), tgt_in
        (B, T) -> h (B, T, D) and backward(dh) -> dmemory (None for train=False). Lets an eval encode a source once
        for its teacher-forced pass and its decode (start_from)."""
        T = tgt_in.shape[1]
        self_mask = make_attention_mask(padding_mask(tgt_in, self.cfg.pad_id), causal=True, tq=T, tk=T,
                                        dtype=self.dtype)
        x, emb_backward = self.tgt_embed(tgt_in, train=train)
        h, dec_backward = self.decoder(x, memory, self_mask=self_mask, cross_mask=cross_mask, record=record,
                                       train=train)
        if not train:
            return h, None

        def backward(dh):
            dx, dmemory = dec_backward(dh)
            emb_backward(dx)
            return dmemory

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
        return self.start_from(memory, cross_mask)

    def start_from(self, memory, cross_mask) -> dict:
        """The decoding state of an encoded source (encode(src, train=False)'s memory (B, S, D) and mask): what
        start(src) returns, without encoding again."""
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
        """Rows idx of the state. The source side (cross-attention K/V, its mask) is kept per source sentence: when
        the new rows come in equal-sized blocks that each decode one source (beam search's K hypotheses per
        sentence), it keeps one row per block (cross-attention then serves a block with one matmul per head), and
        is not copied at all when those sources are the ones it holds already."""
        idx = np.asarray(idx)
        src_rows = _source_rows(state)
        if not src_rows:
            return reorder_state(state, idx)
        g = state["self_pad"].shape[0] // src_rows  # target rows per source row now
        g_new, src = _grouping(idx // g)
        out = reorder_state(state, idx, keep=("cross", "cross_mask"))
        if len(src) == src_rows and np.array_equal(src, np.arange(src_rows)):
            return out  # the same sources in the same order: kept as they are
        side = reorder_state({"caches": [{"cross": c["cross"]} for c in state["caches"]],
                              "cross_mask": state["cross_mask"]}, src)
        for c, sc in zip(out["caches"], side["caches"]):
            c["cross"] = sc["cross"]
        out["cross_mask"] = side["cross_mask"]
        return out

    def reorder_same_source(self, state: dict, idx) -> dict:
        """reorder() for an idx that maps every row to a row of the same source sentence (beam search moving
        hypotheses among one sentence's beams, rows keeping their places in the blocks): the source side is kept
        as it is instead of copied; only the target side (self-attention K/V) is selected."""
        return reorder_state(state, np.asarray(idx), keep=("cross", "cross_mask"))


def _source_rows(state: dict) -> int:
    """Rows of the source-side state (cross-attention K/V): the target rows, or fewer (one per block)."""
    caches = state.get("caches") or []
    return int(caches[0]["cross"]["k"].shape[0]) if caches and "cross" in caches[0] else 0


def _grouping(src_of: np.ndarray) -> tuple[int, np.ndarray]:
    """src_of (N,): the source row of each new row. Returns (g, src): src_of is src repeated g times per entry
    (blocks of g consecutive rows with one source), g = 1 if it has no such blocks."""
    n = len(src_of)
    if n == 0:
        return 1, src_of
    starts = np.flatnonzero(np.r_[True, src_of[1:] != src_of[:-1]])
    g = n // len(starts)
    if g > 1 and n % len(starts) == 0 and np.array_equal(starts, np.arange(0, n, g)):
        return g, src_of[::g]
    return 1, src_of


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
