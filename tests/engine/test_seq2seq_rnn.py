"""Seq2SeqRNN: gradient checks for every cell x attention, incremental decoding equal to the teacher-forced
forward, reorder for beam search, padding of the source, and a tiny overfit through greedy and beam decoding."""
import numpy as np
import pytest

from ndtrain.data.info import BOS, EOS, PAD
from ndtrain.engine import ParamStore, decoding
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.losses import cross_entropy_fused
from ndtrain.engine.optim import Adam
from ndtrain.engine.seq2seq_rnn import Seq2SeqRNN, Seq2SeqRNNConfig

SRC = np.array([[5, 6, 7, EOS], [4, 8, EOS, PAD], [9, EOS, PAD, PAD]])
TGT_IN = np.array([[BOS, 7, 6, 5], [BOS, 8, 4, EOS], [BOS, 9, EOS, 4]])  # full rows: the decoder is unmasked


def _model(cell, attention, layers=2, seed=1, scale=1.0, dtype=np.float64, V=10, H=5):
    m = Seq2SeqRNN(Seq2SeqRNNConfig(V, V + 1, d_embed=4, hidden_size=H, num_layers=layers, cell=cell,
                                    attention=attention, d_attn=3))
    store = ParamStore.from_module(m, dtype=dtype, seed=seed)
    store.data *= scale
    return m, store


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("attention", ["none", "luong", "bahdanau"])
def test_gradcheck(cell, attention):
    # larger weights (x3) so the attention gradients are far above finite-difference noise
    m, _ = _model(cell, attention, scale=3.0)
    errs = assert_gradcheck(m, [SRC, TGT_IN], eps=1e-5)
    assert "encoder.layers.1.0.W_hh" in errs and "src_embed.W" in errs
    assert ("attn.v" in errs) == (attention == "bahdanau") and ("W_c.W" in errs) == (attention != "none")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("attention", ["none", "luong", "bahdanau"])
def test_incremental_steps_equal_teacher_forcing(cell, attention):
    m, _ = _model(cell, attention)
    logits, _ = m(SRC, TGT_IN, train=False)
    state = m.start(SRC)
    l0, state = m.step(TGT_IN[:, :2], state)  # a prompt of two tokens, then one at a time
    np.testing.assert_allclose(l0, logits[:, 1], rtol=1e-12, atol=1e-12)
    for t in range(2, TGT_IN.shape[1]):
        lt, state = m.step(TGT_IN[:, t:t + 1], state)
        np.testing.assert_allclose(lt, logits[:, t], rtol=1e-12, atol=1e-12)
    idx = np.array([2, 2, 0])
    l_re, _ = m.step(TGT_IN[idx, -1:], m.reorder(state, idx))
    l_ref, _ = m.step(TGT_IN[:, -1:], state)
    np.testing.assert_allclose(l_re, l_ref[idx], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ["none", "luong"])
def test_source_padding_is_invisible(attention):
    """A row's logits do not depend on how much padding its source has."""
    m, _ = _model("gru", attention)
    wide = np.concatenate([SRC, np.zeros((3, 3), SRC.dtype)], axis=1)
    a, _ = m(SRC, TGT_IN, train=False)
    b, _ = m(wide, TGT_IN, train=False)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    alone, _ = m(SRC[2:, :2], TGT_IN[2:], train=False)
    np.testing.assert_allclose(alone[0], a[2], rtol=1e-12, atol=1e-12)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="attention"):
        Seq2SeqRNNConfig(5, 5, attention="general")
    with pytest.raises(ValueError, match="cell"):
        Seq2SeqRNNConfig(5, 5, cell="rnn")


@pytest.mark.parametrize("attention", ["none", "bahdanau"])
def test_tiny_overfit_decodes_exactly(attention):
    """Reverse four fixed digit strings: the loss falls and greedy and beam search reproduce every target."""
    rng = np.random.default_rng(0)
    V = 14
    seqs = [rng.integers(4, V, size=n) for n in (5, 3, 4, 2)]
    S = max(len(s) for s in seqs) + 1
    src = np.zeros((4, S), np.int32)
    tgt_in = np.zeros((4, S), np.int32)
    tgt_out = np.zeros((4, S), np.int32)
    for b, s in enumerate(seqs):
        src[b, :len(s) + 1] = list(s) + [EOS]
        r = list(s[::-1])
        tgt_in[b, :len(s) + 1] = [BOS] + r
        tgt_out[b, :len(s) + 1] = r + [EOS]
    m, store = _model("gru", attention, layers=1, seed=0, dtype=np.float32, V=V, H=32)
    opt = Adam(store, lr=0.02)
    first = None
    for _ in range(150):
        store.zero_grad()
        logits, backward = m(src, tgt_in, train=True)
        loss, count, grad_fn = cross_entropy_fused(logits, tgt_out, ignore_index=PAD)
        first = first if first is not None else loss / count
        backward(grad_fn(1.0 / count))
        opt.step()
    assert loss / count < 0.05 * first
    greedy = decoding.greedy(m, src, max_len=S)
    np.testing.assert_array_equal(greedy[:, :S], tgt_out[:, :greedy.shape[1]])
    beams = decoding.beam_search(m, src, beam_size=3, max_len=S)[0]
    for b in range(4):
        n = len(seqs[b]) + 1
        np.testing.assert_array_equal(beams[b, :n], tgt_out[b, :n])


@pytest.mark.parametrize("kind", ["dot", "additive"])
def test_attention_gradcheck_and_masking(kind):
    from ndtrain.engine.recurrent import AdditiveAttention, DotAttention
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 6, 5))
    mask = np.ones((3, 6), bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    m = DotAttention() if kind == "dot" else AdditiveAttention(5, 3)
    errs = assert_gradcheck(m, [q, k, mask])  # cotangents on both the context and the weights
    assert {"input0", "input1"} <= set(errs)
    (ctx, w), _ = m(q, k, mask, train=False)
    assert np.all(w[1, :, 4:] == 0) and np.allclose(w.sum(-1), 1)
    np.testing.assert_allclose(ctx[2], np.repeat(k[2, :1], 4, axis=0), rtol=1e-12)  # one real key: copied


def test_record_exposes_attention_weights():
    m, _ = _model("gru", "luong")
    record = {}
    m(SRC, TGT_IN, train=False, record=record)
    w = record["decoder.cross_attn"]  # (B, 1 head, T, S), the Transformer's convention for heat maps
    assert w.shape == (3, 1, 4, 4) and np.allclose(w.sum(-1), 1) and np.all(w[2, 0, :, 2:] == 0)
    none, _ = _model("gru", "none")
    record = {}
    none(SRC, TGT_IN, train=False, record=record)
    assert record == {}
