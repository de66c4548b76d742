"""Fast evaluation and generation on real Transformer models (float64): batched beam search equals per-sentence
search, beam 1 equals greedy, the length penalty ranks as defined, KV-cached decoding equals full recomputation,
and the forward-only (train=False) path keeps no backward state."""
import tracemalloc

import numpy as np
import pytest

from ndtrain.engine import ParamStore, decoding, kernels
from ndtrain.engine.decoding import EOS, beam_search, greedy, length_penalty, log_softmax64
from ndtrain.engine.transformer import DecoderLM, DecoderLMConfig, Seq2SeqConfig, Seq2SeqTransformer

V = 13


def _seq2seq(seed=3, eos_bias=1.5, **kw):
    cfg = dict(d_model=16, n_heads=2, d_ff=24, max_len=24, src_vocab=V, tgt_vocab=V, n_enc_layers=2,
               n_dec_layers=2, dropout=0.0, tie_output=False)
    cfg.update(kw)
    m = Seq2SeqTransformer(Seq2SeqConfig(**cfg))
    ParamStore.from_module(m, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in m.named_params():  # away from the near-uniform initial distribution: distinct, peaked choices
        p.data += 0.5 * rng.standard_normal(p.shape)
    if not m.cfg.tie_output:
        m.b_out.data[EOS] += eos_bias  # hypotheses end at different lengths
    m.eval()
    return m


def _src(B=6, S=7, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, V, (B, S)).astype(np.int32)
    for b in range(B):
        src[b, S - (b % 4):] = 0  # rows of different lengths (PAD tails)
    return src


class Recompute:
    """An IncrementalDecoder without a cache: every step runs the whole forward over all tokens so far."""

    def __init__(self, model):
        self.m = model

    def start(self, src, batch_size=None):
        return {"src": np.asarray(src), "toks": np.zeros((len(src), 0), np.int32)}

    def step(self, tokens, st):
        toks = np.concatenate([st["toks"], np.asarray(tokens, np.int32)], axis=1)
        logits, backward = self.m(st["src"], toks, train=False)
        assert backward is None
        return logits[:, -1], {"src": st["src"], "toks": toks}

    def reorder(self, st, idx):
        return {"src": st["src"][idx], "toks": st["toks"][idx]}


# -- beam search ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 4])
def test_batched_beam_equals_per_sentence_beam(K):
    m, src = _seq2seq(), _src()
    toks, scores = beam_search(m, src, beam_size=K, max_len=9, alpha=0.6)
    n_eos = 0
    for b in range(src.shape[0]):
        row = src[b:b + 1, :max(1, int((src[b] != 0).sum()))]  # alone, without the batch's padding
        t1, s1 = beam_search(m, row, beam_size=K, max_len=9, alpha=0.6)
        L = t1.shape[1]
        np.testing.assert_array_equal(toks[b, :L], t1[0])
        assert (toks[b, L:] == 0).all()
        assert scores[b] == pytest.approx(s1[0], rel=1e-9, abs=1e-12)
        n_eos += int((t1[0] == EOS).any())
    assert n_eos > 0  # some hypotheses finished with EOS, so the finished-hypothesis bookkeeping ran
    # groups of 2 sentences at a time (how large batches are searched) change nothing
    t2, s2 = beam_search(m, src, beam_size=K, max_len=9, alpha=0.6, group=2)
    np.testing.assert_array_equal(t2, toks)
    np.testing.assert_allclose(s2, scores, rtol=1e-12)


def test_beam_search_with_fewer_model_steps_as_rows_finish():
    """A done row leaves the batch: the step sees fewer rows than B*K once sentences finish."""
    m, src = _seq2seq(), _src()
    seen = []
    step = m.step
    m.step = lambda tokens, state: (seen.append(tokens.shape[0]), step(tokens, state))[1]
    try:
        toks, _ = beam_search(m, src, beam_size=3, max_len=12)
    finally:
        del m.step
    assert seen[0] == src.shape[0] and seen[1] == 3 * src.shape[0]
    lengths = [(r != 0).sum() for r in toks]
    if min(lengths) < max(lengths):
        assert min(seen[1:]) < 3 * src.shape[0]


def test_beam_1_equals_greedy():
    m, src = _seq2seq(seed=4), _src(seed=1)
    g = greedy(m, src, max_len=10)
    b, _ = beam_search(m, src, beam_size=1, max_len=10, alpha=0.0)
    np.testing.assert_array_equal(b[:, :g.shape[1]], g)
    assert (b[:, g.shape[1]:] == 0).all()


class TableDecoder:
    """Row r's next-token probabilities come from tables[r][history] (history: every token fed, BOS included)."""

    def __init__(self, tables, default):
        self.tables, self.default = tables, default

    def start(self, src, batch_size=None):
        return [(int(r[0]) - 4, ()) for r in src]

    def step(self, tokens, state):
        new = [(r, h + tuple(int(t) for t in row)) for (r, h), row in zip(state, tokens)]
        return np.log(np.stack([self.tables[r].get(h, self.default) for r, h in new])), new

    def reorder(self, state, idx):
        return [state[i] for i in idx]


def _dist(**p):
    """Over 8 ids: a=4, b=5, EOS=3; the rest of the mass on ids 6 and 7 (never EOS by chance)."""
    out = np.zeros(8)
    for k, v in p.items():
        out[{"a": 4, "b": 5, "EOS": EOS}[k]] = v
    out[[6, 7]] = max(1.0 - out.sum(), 1e-9) / 2
    out = np.maximum(out, 1e-12)
    return out / out.sum()


def test_length_penalty_ranks_as_defined_in_a_batch():
    """Row 0 prefers its short answer by raw log-probability and its long one once the length penalty divides;
    row 1 differs. Each returned hypothesis is the best by logprob / length_penalty(len), scored so."""
    a, b = 4, 5
    tables = [
        {(2,): _dist(a=0.6, b=0.4), (2, a): _dist(EOS=0.9), (2, b): _dist(b=0.94), (2, b, b): _dist(b=0.94),
         (2, b, b, b): _dist(EOS=0.94)},  # |log p(long)| / |log p(short)| = 1.8
        {(2,): _dist(a=0.5, b=0.5), (2, a): _dist(EOS=0.9), (2, b): _dist(b=0.75), (2, b, b): _dist(EOS=0.75)},
    ]  # row 1's ratio is 1.59: the long answer wins at a stronger penalty than row 0's
    cands = [[(a, EOS), (b, b, b, EOS)], [(a, EOS), (b, b, EOS)]]

    def logp(r, seq):
        h, total = (2,), 0.0
        for t in seq:
            total += np.log(tables[r][h][t])
            h = h + (t,)
        return total

    src = np.array([[4], [5]], np.int32)
    winners = set()
    for kind, alpha in [("gnmt", 0.0), ("fairseq", 1.0), ("gnmt", 4.0)]:
        toks, scores = beam_search(TableDecoder(tables, _dist()), src, beam_size=3, max_len=6, alpha=alpha,
                                   penalty=kind)
        for r in range(2):
            normalized = {c: logp(r, c) / length_penalty(len(c), alpha, kind) for c in cands[r]}
            want = max(normalized, key=normalized.get)
            got = tuple(int(t) for t in toks[r] if t != 0)
            assert got == want, (kind, alpha, r)
            assert scores[r] == pytest.approx(normalized[want], rel=1e-9)
            winners.add((kind, r, len(want)))
    # alpha 0: both short; fairseq 1: row 0 long, row 1 still short (rows ranked independently); gnmt 4: both long
    assert winners == {("gnmt", 0, 2), ("gnmt", 1, 2), ("fairseq", 0, 4), ("fairseq", 1, 2), ("gnmt", 0, 4),
                       ("gnmt", 1, 3)}


# -- KV cache -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cached_decoding_equals_full_recompute(placement):
    m, src = _seq2seq(seed=5, norm_placement=placement), _src(seed=2)
    slow = Recompute(m)
    np.testing.assert_array_equal(greedy(m, src, max_len=10), greedy(slow, src, max_len=10))
    tb, sb = beam_search(m, src, beam_size=3, max_len=10)
    tr, sr = beam_search(slow, src, beam_size=3, max_len=10)
    np.testing.assert_array_equal(tb, tr)
    np.testing.assert_allclose(sb, sr, rtol=1e-9)
    # logits along a path: the cache (decoder self-attention K/V grown per step, the source's cross-attention K/V
    # projected once in start) gives the recomputed logits
    path = greedy(slow, src, max_len=8)
    st_c, st_r = m.start(src), slow.start(src)
    feed = np.full((src.shape[0], 1), 2, np.int32)
    for t in range(path.shape[1]):
        lc, st_c = m.step(feed, st_c)
        lr, st_r = slow.step(feed, st_r)
        np.testing.assert_allclose(lc, lr, rtol=1e-9, atol=1e-11)
        feed = np.where(path[:, t:t + 1] == 0, EOS, path[:, t:t + 1]).astype(np.int32)
    assert st_c["caches"][0]["self"]["k"].shape[2] == path.shape[1]  # one cached key per fed token


def test_lm_generates_incrementally_with_its_cache():
    m = DecoderLM(DecoderLMConfig(d_model=16, n_heads=2, d_ff=24, max_len=32, vocab_size=V, n_layers=2,
                                  dropout=0.0))
    ParamStore.from_module(m, dtype=np.float64, seed=7)
    m.eval()
    prompt = np.random.default_rng(3).integers(4, V, (3, 4)).astype(np.int32)
    calls = []
    step = m.step
    m.step = lambda tokens, state: (calls.append(tokens.shape[1]), step(tokens, state))[1]
    try:
        out = greedy(m, None, prefix=prompt, max_len=12, eos=-1)
    finally:
        del m.step
    assert calls == [4] + [1] * 11  # the prompt once, then one new token per step: nothing recomputed
    ctx = prompt
    for t in range(12):  # the same tokens from full recomputation
        logits, _ = m(ctx, train=False)
        nxt = logits[:, -1].argmax(-1)
        np.testing.assert_array_equal(out[:, t], nxt)
        ctx = np.concatenate([ctx, nxt[:, None].astype(np.int32)], axis=1)


# -- forward only -------------------------------------------------------------------------------------------------------
def _no_training_kernels(monkeypatch):
    """Any derivative / dropout / backward kernel called on the forward-only path fails the test."""
    import ndtrain.engine.attention as attention
    import ndtrain.engine.transformer.blocks as blocks
    import ndtrain.engine.transformer.stacks as stacks

    def boom(*a, **k):
        raise AssertionError("a training-only kernel ran in a forward-only pass")

    for mod, name in [(kernels, "gelu_tanh_with_derivative"), (kernels, "gelu_tanh"), (kernels, "gelu_tanh_backward"),
                      (kernels, "layer_norm_backward"), (attention, "dropout_mask"), (blocks, "dropout_mask"),
                      (stacks, "dropout_mask")]:
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_forward_only_returns_no_backward_and_the_same_logits(monkeypatch, activation):
    m, src = _seq2seq(activation=activation, dropout=0.3), _src()
    m0 = _seq2seq(activation=activation, dropout=0.0)  # the same parameters (same seeds), no dropout
    tgt = np.concatenate([np.full((src.shape[0], 1), 2, np.int32), _src(seed=9)[:, :5]], axis=1)
    ref, backward = m0(src, tgt, train=True)  # the training path (it keeps its backward)
    assert callable(backward)
    _no_training_kernels(monkeypatch)
    logits, backward = m(src, tgt, train=False)
    assert backward is None
    np.testing.assert_allclose(logits, ref, rtol=1e-10, atol=1e-12)
    x = np.random.default_rng(0).standard_normal((3, 4, 16))
    for name, mod in m.named_modules():  # and every layer on the way: nothing returns a backward
        if type(mod).__name__ in ("LayerNorm", "RMSNorm", "PositionWiseFFN", "EncoderBlock"):
            assert mod(x, train=False)[1] is None, name
        if type(mod).__name__ == "MultiHeadAttention":
            assert mod(x, x if mod.cross else None, train=False)[1] is None, name


def test_forward_only_keeps_nothing_and_peaks_lower():
    """train=True keeps every layer's activations for the backward; train=False frees each layer's temporaries as
    it goes, so its peak is far lower and nothing outlives the call but the logits."""
    m = Seq2SeqTransformer(Seq2SeqConfig(d_model=64, n_heads=4, d_ff=256, max_len=40, src_vocab=50, tgt_vocab=50,
                                         n_enc_layers=3, n_dec_layers=3, dropout=0.1))
    ParamStore.from_module(m, dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(4, 50, (32, 32)).astype(np.int32), rng.integers(4, 50, (32, 32)).astype(np.int32)

    def measure(train):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        logits, backward = m(src, tgt, train=train)
        held = tracemalloc.get_traced_memory()[0] - base
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return logits, backward, held, peak

    m.train()
    _, backward, held_train, peak_train = measure(True)
    del backward
    m.eval()
    logits, backward, held_eval, peak_eval = measure(False)
    assert backward is None
    assert held_eval <= logits.nbytes * 1.1 + 64 * 1024  # the logits, and nothing else of size
    assert held_train > 8 * held_eval
    assert peak_eval < 0.5 * peak_train


def test_gelu_tanh_inplace_equals_the_layer_kernel():
    x = np.random.default_rng(0).standard_normal((70, 1000)).astype(np.float32) * 4  # several chunks
    want, _ = kernels.gelu_tanh(x)
    got = kernels.gelu_tanh_inplace(x.copy())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    x64 = np.linspace(-30, 30, 301)
    np.testing.assert_allclose(kernels.gelu_tanh_inplace(x64.copy()), kernels.gelu_tanh(x64)[0], rtol=1e-14,
                               atol=1e-300)


def test_log_softmax64_rows_sum_to_one():
    z = log_softmax64(np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32))
    np.testing.assert_allclose(np.exp(z).sum(-1), 1.0, rtol=1e-12)
    assert decoding.BEAM_GROUP_ELEMS > 0
