"""The eval / decode fast paths equal their slow references (float64): the fused loss + argmax pass, the chunked
top-token search and beam candidates, the growing KV cache, and cross-attention shared by a sentence's beams."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, decoding
from ndtrain.engine.attention import KVCache
from ndtrain.engine.cross_entropy import xent_rows_argmax
from ndtrain.engine.decoding import EOS, beam_search, log_softmax64
from ndtrain.engine.losses import cross_entropy_fused
from ndtrain.engine.transformer import Seq2SeqConfig, Seq2SeqTransformer
from ndtrain.engine.transformer.seq2seq import reorder_state

RNG = np.random.default_rng(11)


def test_xent_rows_argmax_equals_cross_entropy_and_argmax():
    z = RNG.standard_normal((37, 300)) * 4
    z[5, [7, 90]] = z[5].max() + 1.0  # a tie: the first id wins, as np.argmax
    t = RNG.integers(0, 300, 37)
    ref_pred = z.argmax(axis=-1)
    ref_sum, _, _ = cross_entropy_fused(z.copy(), t)
    per, pred = xent_rows_argmax(z.copy(), t, block_elems=1000)  # several row blocks
    np.testing.assert_array_equal(pred, ref_pred)
    assert pred[5] == 7
    assert abs(per.sum() - ref_sum) <= 1e-12 * abs(ref_sum)
    lp = log_softmax64(z)
    np.testing.assert_allclose(per, -lp[np.arange(37), t], rtol=1e-12)


@pytest.mark.parametrize("V", [8000, 1000, 1003, 90])  # whole chunks, a tail past the last chunk, a short row
def test_top_tokens_are_the_c_largest(V):
    z = RNG.standard_normal((23, V)).astype(np.float32) * 3
    z[3, :] = -5.0 - np.arange(V) / V  # distinct values (ties at the c-th value may be taken in any order)
    z[3, [V - 1, 0, V // 2]] = [4.0, 3.0, 2.0]  # the best ids at the edges of the row and in the tail
    for c in (1, 10):
        tok, m = decoding._top_tokens(z, c)
        np.testing.assert_array_equal(m, z.max(axis=-1))
        want = np.sort(np.argsort(-z, axis=-1, kind="stable")[:, :c], axis=-1)
        np.testing.assert_array_equal(np.sort(tok, axis=-1), want)
    assert set(decoding._top_tokens(z, 3)[0][3]) == {V - 1, 0, V // 2}


def _candidates_reference(scores, logits, n):
    """The slow path: every K * V extension scored in float64, a stable sort by value (ties: lower flat id)."""
    A, K = scores.shape
    V = logits.shape[1]
    cand = (scores.reshape(A * K, 1) + log_softmax64(logits)).reshape(A, K * V)
    order = np.argsort(-cand, axis=-1, kind="stable")[:, :n]
    return np.take_along_axis(cand, order, axis=-1), order


@pytest.mark.parametrize("V", [1000, 1003, 50])  # whole chunks, a tail past the last chunk, short rows
def test_beam_candidates_equal_the_full_sort(V):
    A, K = 6, 4
    logits = RNG.standard_normal((A * K, V)) * 3
    scores = np.log(RNG.random((A, K)))
    scores[0, 1:] = -np.inf  # the first step: one live hypothesis per sentence
    vals, flat = decoding._candidates(scores, logits, 2 * K)
    ref_vals, ref_flat = _candidates_reference(scores, logits, 2 * K)
    np.testing.assert_array_equal(flat, ref_flat)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-13)


def test_lse_by_blocks_equals_the_plain_form():
    z = RNG.standard_normal((50, 700)) * 5
    plain = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    old = decoding.LSE_BLOCK_ELEMS
    try:
        decoding.LSE_BLOCK_ELEMS = 2000  # 2 rows a block
        np.testing.assert_allclose(decoding._logsumexp64(z), plain, rtol=1e-14)
    finally:
        decoding.LSE_BLOCK_ELEMS = old


def test_kv_cache_appends_in_place_and_old_views_keep_their_values():
    k0, v0 = RNG.standard_normal((3, 2, 4, 5)), RNG.standard_normal((3, 2, 4, 5))
    c0 = KVCache.of(k0, v0)
    k1, v1 = RNG.standard_normal((3, 2, 1, 5)), RNG.standard_normal((3, 2, 1, 5))
    c1 = c0.append(k1, v1)
    assert c1.kbuf is c0.kbuf  # written into the room, no copy
    np.testing.assert_array_equal(c1["k"], np.concatenate([k0, k1], axis=2))
    np.testing.assert_array_equal(c0["k"], k0)  # the older view reads what it read
    # a second append to the older view (a state decoded from twice) copies: both branches stay right
    k2, v2 = RNG.standard_normal((3, 2, 1, 5)), RNG.standard_normal((3, 2, 1, 5))
    c2 = c0.append(k2, v2)
    assert c2.kbuf is not c0.kbuf
    np.testing.assert_array_equal(c2["v"], np.concatenate([v0, v2], axis=2))
    np.testing.assert_array_equal(c1["v"], np.concatenate([v0, v1], axis=2))
    # past the room: reallocated, same values
    c = c1
    for _ in range(KVCache.ROOM + 2):
        c = c.append(k1, v1)
    assert c.n == 5 + KVCache.ROOM + 2 and c["k"].shape == (3, 2, c.n, 5)
    np.testing.assert_array_equal(c["k"][:, :, :5], c1["k"])
    s = c1.select(np.array([2, 2, 0]))
    np.testing.assert_array_equal(s["k"], c1["k"][[2, 2, 0]])


def _model(seed=3):
    m = Seq2SeqTransformer(Seq2SeqConfig(d_model=16, n_heads=2, d_ff=24, max_len=24, src_vocab=13, tgt_vocab=13,
                                         n_enc_layers=2, n_dec_layers=2, dropout=0.0, tie_output=False))
    ParamStore.from_module(m, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in m.named_params():
        p.data += 0.5 * rng.standard_normal(p.shape)
    m.b_out.data[EOS] += 1.5
    m.eval()
    return m


def _src(B=5, S=7):
    src = np.random.default_rng(0).integers(4, 13, (B, S)).astype(np.int32)
    for b in range(B):
        src[b, S - (b % 4):] = 0
    return src


def test_cross_attention_is_shared_by_a_sentences_beams_and_equals_the_copied_state():
    m, src = _model(), _src()
    B, K = src.shape[0], 3
    state = m.start(src)
    logits, state = m.step(np.full((B, 1), 2, np.int32), state)
    rows = np.repeat(np.arange(B), K)
    grouped = m.reorder(state, rows)  # beam search's expansion: the source side is not copied
    copied = reorder_state(state, rows)  # the reference: every row its own copy of the source side
    assert grouped["caches"][0]["cross"]["k"].shape[0] == B
    assert copied["caches"][0]["cross"]["k"].shape[0] == B * K
    tok = np.random.default_rng(1).integers(4, 13, (B * K, 1)).astype(np.int32)
    lg, grouped = m.step(tok, grouped)
    lc, copied = m.step(tok, copied)
    np.testing.assert_allclose(lg, lc, rtol=1e-12, atol=1e-12)
    # sentences 1 and 3 leave the batch: the remaining blocks keep one source row each
    keep = np.concatenate([np.arange(K) + K * s for s in (0, 2, 4)])
    g2, c2 = m.reorder(grouped, keep[::-1].copy()), reorder_state(copied, keep[::-1].copy())
    assert g2["caches"][1]["cross"]["k"].shape[0] == 3
    tok2 = tok[keep]
    np.testing.assert_allclose(m.step(tok2, g2)[0], m.step(tok2, c2)[0], rtol=1e-12, atol=1e-12)
    # rows that are not in blocks get their own copy of the source side
    mixed = m.reorder(grouped, np.array([0, 3, 4]))
    assert mixed["caches"][0]["cross"]["k"].shape[0] == 3
    np.testing.assert_allclose(m.step(tok[:3], mixed)[0], m.step(tok[:3], reorder_state(copied, np.array([0, 3, 4])))[0],
                               rtol=1e-12, atol=1e-12)


def test_beam_search_from_a_given_start_state_equals_starting_itself():
    m, src = _model(seed=5), _src(B=6)
    memory, mask, _ = m.encode(src, train=False)
    for group in (None, 4):  # one group, or groups that take their rows of the given state
        t0, s0 = beam_search(m, src, beam_size=3, max_len=9, group=group)
        t1, s1 = beam_search(m, src, beam_size=3, max_len=9, group=group, start_state=m.start_from(memory, mask))
        np.testing.assert_array_equal(t1, t0)
        np.testing.assert_array_equal(s1, s0)
    g0 = decoding.greedy(m, src, max_len=9)
    np.testing.assert_array_equal(decoding.greedy(m, src, max_len=9, start_state=m.start_from(memory, mask)), g0)


def test_greedy_drops_finished_rows_and_decodes_the_same(monkeypatch):
    m, src = _model(seed=4), _src(B=7)
    seen = []
    step = m.step
    monkeypatch.setattr(m, "step", lambda tokens, state: (seen.append(tokens.shape[0]), step(tokens, state))[1],
                        raising=False)
    monkeypatch.setattr(decoding, "COMPACT_SHARE", 2.0)  # never compact: the reference
    ref = decoding.greedy(m, src, max_len=12)
    n_ref = sum(seen)
    seen.clear()
    monkeypatch.setattr(decoding, "COMPACT_SHARE", 0.0)  # drop finished rows at every step
    got = decoding.greedy(m, src, max_len=12)
    np.testing.assert_array_equal(got, ref)
    lengths = (ref != 0).sum(axis=1)
    assert lengths.min() < lengths.max()  # rows finished at different steps
    assert sum(seen) < n_ref and seen[-1] < src.shape[0]
    # sampling keeps every row (its random stream does not depend on who finished): seeded, the same text
    a = decoding.sample(m, src, max_len=12, rng=3)
    np.testing.assert_array_equal(decoding.sample(m, src, max_len=12, rng=3), a)
