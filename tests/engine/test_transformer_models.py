"""Whole Transformer models: float64 gradient checks at small sizes, forward semantics, and KV-cache decoding that
equals a full recompute."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.module import seed_rngs
from ndtrain.engine.transformer import (DecoderLM, DecoderLMConfig, EncoderClassifier, EncoderClassifierConfig,
                                        FeatureTokenClassifier, Seq2SeqConfig, Seq2SeqTransformer)
from helpers.perturb import perturb

RNG = np.random.default_rng(0)
SMALL = dict(d_model=8, n_heads=2, d_ff=12, max_len=16)


def _ids(shape, vocab, pad_tail=None, rng=RNG):
    ids = rng.integers(4, vocab, shape)
    if pad_tail:
        for row, n in pad_tail.items():
            ids[row, ids.shape[1] - n:] = 0
    return ids


S2S_CASES = [
    dict(norm_placement="pre", positional="learned", share_embeddings=False, tie_output=True),
    dict(norm_placement="post", positional="sinusoidal", share_embeddings=True, tie_output=False,
         scale_embedding=True, norm="rms", activation="relu"),
]


@pytest.mark.parametrize("kw", S2S_CASES)
def test_seq2seq_gradcheck(kw):
    vocab = 9
    cfg = Seq2SeqConfig(**SMALL, src_vocab=vocab, tgt_vocab=vocab, n_enc_layers=1, n_dec_layers=2, dropout=0.1,
                        **kw)
    m = Seq2SeqTransformer(cfg)
    store = ParamStore.from_module(m, dtype=np.float64, seed=1)
    assert bool(store.aliases) == kw["share_embeddings"]
    perturb(m, scale=0.2)
    src, tgt = _ids((2, 5), vocab, {1: 2}), _ids((2, 4), vocab, {0: 1})
    assert_gradcheck(m, [src, tgt], before_forward=lambda: seed_rngs(m, 7), n_dirs=3)


def test_decoder_lm_gradcheck_tied():
    m = DecoderLM(DecoderLMConfig(**SMALL, vocab_size=10, n_layers=2, dropout=0.1, activation="swiglu"))
    store = ParamStore.from_module(m, dtype=np.float64, seed=2)
    assert "w_out" not in "".join(store.params)  # tied: the output projection is the embedding
    perturb(m, scale=0.2)
    assert_gradcheck(m, [_ids((2, 5), 10, {1: 2})], before_forward=lambda: seed_rngs(m, 8), n_dirs=3)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_classifier_gradcheck(pooling):
    m = EncoderClassifier(EncoderClassifierConfig(**SMALL, vocab_size=10, n_classes=3, n_layers=1, dropout=0.0,
                                                  pooling=pooling, norm_placement="post"))
    ParamStore.from_module(m, dtype=np.float64, seed=3)
    perturb(m, scale=0.2)
    x = _ids((3, 5), 10, {2: 3})
    assert_gradcheck(m, [x], n_dirs=3)
    logits, _ = m(x, train=False)
    assert logits.shape == (3, 3)


def test_decoder_lm_is_causal():
    m = DecoderLM(DecoderLMConfig(**SMALL, vocab_size=10, n_layers=2, dropout=0.0))
    ParamStore.from_module(m, dtype=np.float64)
    x = _ids((2, 7), 10)
    y, _ = m(x, train=False)
    x2 = x.copy()
    x2[:, 4:] = (x2[:, 4:] + 1 - 4) % 6 + 4  # change every token after position 3
    y2, _ = m(x2, train=False)
    np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y2[:, 4:], y[:, 4:])


def test_seq2seq_ignores_source_padding_and_records_weights():
    m = Seq2SeqTransformer(Seq2SeqConfig(**SMALL, src_vocab=9, tgt_vocab=9, n_enc_layers=1, n_dec_layers=1,
                                         dropout=0.0))
    ParamStore.from_module(m, dtype=np.float64)
    src, tgt = _ids((1, 4), 9), _ids((1, 3), 9)
    rec = {}
    y, _ = m(src, tgt, record=rec, train=False)
    padded = np.concatenate([src, np.zeros((1, 3), int)], axis=1)
    np.testing.assert_allclose(m(padded, tgt, train=False)[0], y, rtol=1e-10, atol=1e-12)
    assert set(rec) == {"encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.cross_attn"}
    assert rec["decoder.layers.0.cross_attn"].shape == (1, 2, 3, 4)


def _decode_all(model, state, tokens):
    """Feed tokens (B, T) one at a time (the first two as a 'prompt'), return (B, T-1, V) logits after each."""
    out = []
    logits, state = model.step(tokens[:, :2], state)
    out.append(logits)
    for t in range(2, tokens.shape[1]):
        logits, state = model.step(tokens[:, t:t + 1], state)
        out.append(logits)
    return np.stack(out, axis=1), state


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_seq2seq_kv_cache_equals_full_recompute(placement):
    m = Seq2SeqTransformer(Seq2SeqConfig(**SMALL, src_vocab=9, tgt_vocab=11, n_enc_layers=2, n_dec_layers=2,
                                         dropout=0.3, norm_placement=placement, tie_output=False))
    ParamStore.from_module(m, dtype=np.float64, seed=5)
    assert all(callable(getattr(m, name, None)) for name in ('start', 'step', 'reorder'))  # IncrementalDecoder
    src, tgt = _ids((3, 6), 9, {1: 2}), _ids((3, 5), 11, {2: 1})
    full, _ = m(src, tgt, train=False)
    inc, state = _decode_all(m, m.start(src), tgt)
    np.testing.assert_allclose(inc, full[:, 1:], rtol=1e-9, atol=1e-10)
    # reorder (beam search): rows 2, 0, 0 continue exactly as those rows would
    nxt = _ids((3, 1), 11)
    r_logits, _ = m.step(nxt, m.reorder(state, np.array([2, 0, 0])))
    full2, _ = m(src[[2, 0, 0]], np.concatenate([tgt[[2, 0, 0]], nxt], axis=1), train=False)
    np.testing.assert_allclose(r_logits, full2[:, -1], rtol=1e-9, atol=1e-10)


def test_decoder_lm_kv_cache_equals_full_recompute_and_checks_max_len():
    m = DecoderLM(DecoderLMConfig(**SMALL, vocab_size=10, n_layers=2, dropout=0.0, positional="sinusoidal"))
    ParamStore.from_module(m, dtype=np.float64, seed=6)
    x = _ids((2, 6), 10)
    full, _ = m(x, train=False)
    inc, state = _decode_all(m, m.start(None, batch_size=2), x)
    np.testing.assert_allclose(inc, full[:, 1:], rtol=1e-9, atol=1e-10)
    assert state["pos"] == 6
    with pytest.raises(ValueError, match="max_len 16"):
        m.step(_ids((2, 11), 10), state)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="Seq2SeqConfig.norm_placement"):
        Seq2SeqTransformer(Seq2SeqConfig(norm_placement="middle"))
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqTransformer(Seq2SeqConfig(src_vocab=5, tgt_vocab=6, share_embeddings=True))
    with pytest.raises(ValueError, match="DecoderLMConfig.d_model"):
        DecoderLM(DecoderLMConfig(d_model=10, n_heads=4))


def test_feature_token_classifier_gradcheck_and_shapes():
    """FT-Transformer: x (B, F) float -> one token per feature -> encoder -> mean -> logits (B, C); parameters and dx
    checked in float64."""
    cfg = EncoderClassifierConfig(d_model=8, n_heads=2, d_ff=12, max_len=3, n_layers=1, dropout=0.0)
    m = FeatureTokenClassifier(cfg, n_features=3, n_classes=2)
    ParamStore.from_module(m, dtype=np.float64, seed=0)
    perturb(m, scale=0.2)
    x = RNG.standard_normal((4, 3))
    logits, backward = m(x, train=True)
    assert logits.shape == (4, 2) and backward(np.ones_like(logits)).shape == (4, 3)
    assert m(x, train=False)[1] is None  # forward-only in eval: nothing kept
    np.testing.assert_allclose(m(x, train=False)[0], logits)  # no dropout: the same logits
    assert_gradcheck(m, [x])
