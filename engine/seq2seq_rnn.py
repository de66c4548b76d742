"""RNN encoder-decoder (Sutskever et al. 2014; Cho et al. 2014) with optional attention (Bahdanau et al. 2015;
Luong et al. 2015).

    src (B, S) -> embed -> encoder GRU/LSTM (L layers) -> enc_out (B, S, H), final state (L, B, H)
    tgt_in (B, T) -> embed -> decoder GRU/LSTM, initial state = the encoder's final state -> dec_out (B, T, H)
    attention "none":     logits = dec_out W_out                        the whole source passes through one
                                                                         (L, B, H) state: the context bottleneck
    attention "luong" / "bahdanau":  context = attend(dec_out, enc_out)  (B, T, H)
                          h~ = tanh([context; dec_out] W_c)  logits = h~ W_out

Padding: source rows are right-padded with cfg.pad_id; the encoder's final state is each row's state at its last real
token (padding-aware RNN), and attention never looks at padded positions. The decoder runs over the padded target
unmasked: its padded positions come after the real ones and the loss ignores them.

Implements the IncrementalDecoder protocol (start/step/reorder), so greedy and beam search come from
engine/decoding.py. The decoding state is a dict: enc_out, src_mask and the decoder's RNN state (h, c).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Embedding, Linear
from .module import Module
from .recurrent import GRU, LSTM
from .recurrent.attention import AdditiveAttention, DotAttention

CELLS = {"gru": GRU, "lstm": LSTM}
ATTENTIONS = ("none", "bahdanau", "luong")


@dataclass
class Seq2SeqRNNConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_embed: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "gru"  # gru | lstm
    attention: str = "none"  # none | bahdanau | luong
    d_attn: int = 0  # bahdanau's tanh width; 0 -> hidden_size
    pad_id: int = 0  # the padding token id of source and target (the data layer's PAD)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"Seq2SeqRNNConfig.cell: must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqRNNConfig.attention: must be one of {', '.join(ATTENTIONS)}, "
                             f"got {self.attention!r}")
        for name in ("src_vocab_size", "tgt_vocab_size", "d_embed", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"Seq2SeqRNNConfig.{name}: must be >= 1, got {getattr(self, name)}")


class Seq2SeqRNN(Module):
    """(src (B, S) int, tgt_in (B, T) int) -> logits (B, T, V_tgt); backward(dlogits) returns None."""

    def __init__(self, cfg: Seq2SeqRNNConfig):
        super().__init__()
        self.cfg = cfg
        H, E, L = cfg.hidden_size, cfg.d_embed, cfg.num_layers
        rnn = CELLS[cfg.cell]
        self.src_embed = Embedding(cfg.src_vocab_size, E, padding_idx=cfg.pad_id)
        self.tgt_embed = Embedding(cfg.tgt_vocab_size, E, padding_idx=cfg.pad_id)
        self.encoder = rnn(E, H, num_layers=L)
        self.decoder = rnn(E, H, num_layers=L)
        self.attn = None
        if cfg.attention == "luong":
            self.attn = DotAttention()
        elif cfg.attention == "bahdanau":
            self.attn = AdditiveAttention(H, cfg.d_attn or H)
        if self.attn is not None:
            self.W_c = Linear(2 * H, H, bias=False)
        self.W_out = Linear(H, cfg.tgt_vocab_size)

    # -- shared pieces ------------------------------------------------------------------------------------------------
    def _encode(self, src, train):
        src = np.asarray(src)
        src_mask = src != self.cfg.pad_id  # (B, S)
        lengths = src_mask.sum(axis=1)
        e, b_emb = self.src_embed(src, train=train)  # (B, S, E)
        ys, b_enc = self.encoder(e, lengths, train=train)  # (enc_out, h_n[, c_n])
        return ys[0], ys[1:], src_mask, (b_emb, b_enc)

    def _head(self, dec_out, enc_out, src_mask, train, record=None):
        """dec_out (B, T, H) -> logits (B, T, V), backward(dlogits) -> (ddec_out, denc_out or None)."""
        if self.attn is None:
            logits, b_out = self.W_out(dec_out, train=train)
            return logits, lambda dl: (b_out(dl), None)
        (context, weights), b_attn = self.attn(dec_out, enc_out, src_mask, train=train)
        if record is not None:  # the Transformer's convention (engine/attention.py): (B, heads, T, S), one head here
            record["decoder.cross_attn"] = weights[:, None]
        H = dec_out.shape[-1]
        pre, b_c = self.W_c(np.concatenate([context, dec_out], axis=-1), train=train)  # (B, T, H)
        h_tilde = np.tanh(pre)
        logits, b_out = self.W_out(h_tilde, train=train)

        def backward(dlogits):
            dpre = b_out(dlogits)
            dpre *= 1.0 - h_tilde * h_tilde
            dcat = b_c(dpre)  # (B, T, 2H)
            dquery, denc = b_attn(dcat[..., :H])
            return dquery + dcat[..., H:], denc

        return logits, backward

    # -- training ------------------------------------------------------------------------------------------------------
    def forward(self, src, tgt_in, *, train: bool, record: dict | None = None):
        """record: a dict that receives the attention weights under "decoder.cross_attn" (for heat maps)."""
        enc_out, enc_state, src_mask, (b_src_emb, b_enc) = self._encode(src, train)
        d, b_tgt_emb = self.tgt_embed(np.asarray(tgt_in), train=train)  # (B, T, E)
        ys, b_dec = self.decoder(d, None, *enc_state, train=train)  # initial state: the encoder's final state
        logits, b_head = self._head(ys[0], enc_out, src_mask, train, record)

        def backward(dlogits):
            ddec, denc = b_head(dlogits)
            grads = b_dec(ddec)  # (dx, None, dh0[, dc0])
            b_tgt_emb(grads[0])
            dx_src = b_enc(denc, *grads[2:])
            b_src_emb(dx_src)
            return None

        return logits, backward

    # -- IncrementalDecoder --------------------------------------------------------------------------------------------
    def start(self, src, batch_size=None):
        if src is None:
            raise ValueError("Seq2SeqRNN.start: needs the source batch src (B, S)")
        enc_out, enc_state, src_mask, _ = self._encode(src, False)
        return {"enc_out": enc_out, "src_mask": src_mask, "rnn": tuple(enc_state)}

    def step(self, tokens, state):
        """tokens (B, t) -> logits (B, V) at the last new position, and the advanced state."""
        d, _ = self.tgt_embed(np.asarray(tokens), train=False)
        ys, _ = self.decoder(d, None, *state["rnn"], train=False)
        last = ys[0][:, -1:]  # (B, 1, H): the RNN state is all the history attention needs
        logits, _ = self._head(last, state["enc_out"], state["src_mask"], False)
        return logits[:, 0], {**state, "rnn": tuple(ys[1:])}

    def reorder(self, state, idx):
        idx = np.asarray(idx)
        return {"enc_out": state["enc_out"][idx], "src_mask": state["src_mask"][idx],
                "rnn": tuple(s[:, idx] for s in state["rnn"])}
