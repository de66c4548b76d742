"""Decoding algorithms against hand-made IncrementalDecoders whose answers are known by hand."""
import math

import numpy as np
import pytest

from ndtrain.data.info import BOS as INFO_BOS, EOS as INFO_EOS, PAD as INFO_PAD
from ndtrain.engine.decoding import (BOS, EOS, PAD, beam_search, greedy, length_penalty, sample,
                                     sampling_distribution)

A, B_, C, D = 4, 5, 6, 7  # ordinary token ids (0-3 are PAD UNK BOS EOS)
V = 8


def dist(**named):
    """A probability vector over V ids from {"a": p, "EOS": p, ...}; the rest of the mass spread evenly over the
    ids not named, except EOS (so unnamed continuations do not end by chance) and BOS/PAD."""
    ids = {"a": A, "b": B_, "c": C, "d": D, "EOS": EOS, "UNK": 1}
    p = np.zeros(V)
    for k, v in named.items():
        p[ids[k]] = v
    rest = [i for i in range(V) if p[i] == 0 and i not in (EOS, BOS, PAD)]
    p[rest] = (1.0 - p.sum()) / len(rest)
    p[[EOS, BOS, PAD]] = np.where(p[[EOS, BOS, PAD]] == 0, 1e-12, p[[EOS, BOS, PAD]])
    return p / p.sum()


class FnDecoder:
    """An IncrementalDecoder whose next-token probabilities are fn(src_row, history) (history: every token fed so
    far, BOS included). Counts step calls and the longest history it was asked about."""

    def __init__(self, fn):
        self.fn, self.n_steps, self.max_hist = fn, 0, 0

    def start(self, src, batch_size=None):
        rows = [tuple(r) for r in src] if src is not None else [()] * batch_size
        return [(r, ()) for r in rows]

    def step(self, tokens, state):
        assert tokens.dtype == np.int32 and tokens.ndim == 2 and tokens.shape[0] == len(state)
        self.n_steps += 1
        new = [(s, h + tuple(int(t) for t in row)) for (s, h), row in zip(state, tokens)]
        self.max_hist = max(self.max_hist, max(len(h) for _, h in new))
        logits = np.stack([np.log(self.fn(s, h)) for s, h in new])
        return logits.astype(np.float32), new

    def reorder(self, state, idx):
        return [state[i] for i in idx]


def table_decoder(table, default=None):
    default = dist() if default is None else default
    return FnDecoder(lambda s, h: table.get(h, default))


def logp(table, seq):
    """Log-probability of the generated `seq` after BOS under a table."""
    h, total = (BOS,), 0.0
    for t in seq:
        total += math.log(table[h][t])
        h = h + (t,)
    return total


def test_special_ids_match_data_info():
    assert (PAD, BOS, EOS) == (INFO_PAD, INFO_BOS, INFO_EOS)


def test_greedy_picks_argmax_path_and_pads_after_eos():
    table = {(BOS,): dist(a=0.5, b=0.4), (BOS, A): dist(c=0.6), (BOS, A, C): dist(EOS=0.9)}
    m = table_decoder(table)
    out = greedy(m, batch_size=2, max_len=10)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[A, C, EOS], [A, C, EOS]])
    assert m.n_steps == 3  # stopped at EOS, not at max_len


def test_eos_stops_each_row_and_max_len_cuts():
    # row with src (1,) ends after 1 token, row (2,) after 3 tokens
    def fn(s, h):
        n_gen = len(h) - 1
        return dist(EOS=0.9) if n_gen >= s[0] * 2 - 1 else dist(b=0.9)
    m = FnDecoder(fn)
    out = greedy(m, np.array([[1], [2]]), max_len=10)
    np.testing.assert_array_equal(out, [[B_, EOS, PAD, PAD], [B_, B_, B_, EOS]])
    assert m.n_steps == 4
    out = greedy(FnDecoder(fn), np.array([[1], [2]]), max_len=2)
    np.testing.assert_array_equal(out, [[B_, EOS], [B_, B_]])


def test_beam_finds_better_sequence_than_greedy():
    table = {(BOS,): dist(a=0.5, b=0.4),
             (BOS, A): dist(EOS=0.3, a=0.25, b=0.25),  # greedy: a EOS = 0.15
             (BOS, B_): dist(EOS=0.9)}                  # beam:   b EOS = 0.36
    g = greedy(table_decoder(table), batch_size=1, max_len=5)
    np.testing.assert_array_equal(g, [[A, EOS]])
    tok, score = beam_search(table_decoder(table), batch_size=1, beam_size=2, max_len=5, alpha=0.0)
    np.testing.assert_array_equal(tok, [[B_, EOS]])
    assert score[0] == pytest.approx(math.log(0.4 * 0.9), rel=1e-6)
    assert score[0] > logp(table, [A, EOS])
    # beam size 1 is greedy
    tok1, _ = beam_search(table_decoder(table), batch_size=1, beam_size=1, max_len=5, alpha=0.0)
    np.testing.assert_array_equal(tok1, g)


LP_TABLE = {(BOS,): dist(a=0.6, b=0.39),
            (BOS, A): dist(EOS=0.6),
            (BOS, B_): dist(c=0.95), (BOS, B_, C): dist(d=0.95), (BOS, B_, C, D): dist(EOS=0.95)}
SHORT, LONG = [A, EOS], [B_, C, D, EOS]


@pytest.mark.parametrize("alpha,penalty,winner", [(0.0, "gnmt", SHORT), (1.0, "fairseq", LONG), (1.0, "gnmt", LONG)])
def test_length_penalty_changes_the_winner(alpha, penalty, winner):
    lp_short, lp_long = logp(LP_TABLE, SHORT), logp(LP_TABLE, LONG)
    assert lp_short > lp_long  # by raw probability the short one wins
    tok, score = beam_search(table_decoder(LP_TABLE), batch_size=1, beam_size=2, max_len=8, alpha=alpha,
                             penalty=penalty)
    np.testing.assert_array_equal(tok[0, :len(winner)], winner)
    expect = logp(LP_TABLE, winner) / length_penalty(len(winner), alpha, penalty)
    assert score[0] == pytest.approx(expect, rel=1e-6)
    # n_best returns both, best first, scores sorted
    toks, scores = beam_search(table_decoder(LP_TABLE), batch_size=1, beam_size=2, max_len=8, alpha=alpha,
                               penalty=penalty, n_best=2)
    assert toks.shape[:2] == (1, 2) and scores[0, 0] >= scores[0, 1]
    found = {tuple(t[t != PAD]) for t in toks[0]}
    assert found == {tuple(SHORT), tuple(LONG)}


def test_length_penalty_formulas():
    assert length_penalty(7, 0.6, "gnmt") == pytest.approx(((5 + 7) / 6) ** 0.6)
    assert length_penalty(7, 0.6, "fairseq") == pytest.approx(7 ** 0.6)
    assert length_penalty(7, 0.0) == 1.0
    with pytest.raises(ValueError):
        length_penalty(3, 1.0, "nope")


def test_beam_max_len_finishes_live_hypotheses_without_eos():
    never_ends = dist(a=0.7, b=0.2)
    tok, score = beam_search(table_decoder({}, default=never_ends), batch_size=1, beam_size=2, max_len=3, alpha=0.0)
    np.testing.assert_array_equal(tok, [[A, A, A]])
    assert score[0] == pytest.approx(3 * math.log(never_ends[A]), rel=1e-6)


def markov(seed, V=V, eos_bias=0.0):
    M = np.random.default_rng(seed).standard_normal((V, V)) * 2.0
    M[:, EOS] += eos_bias
    P = np.exp(M) / np.exp(M).sum(1, keepdims=True)
    return FnDecoder(lambda s, h: P[h[-1]]), P


def test_beam_batch_rows_are_independent():
    def fn(s, h):
        return LP_TABLE.get(h, dist()) if s[0] == 0 else {(BOS,): dist(a=0.5, b=0.4), (BOS, A): dist(EOS=0.3),
                                                          (BOS, B_): dist(EOS=0.9)}.get(h, dist())
    tok, _ = beam_search(FnDecoder(fn), np.array([[0], [1]]), beam_size=2, max_len=8, alpha=1.0, penalty="fairseq")
    np.testing.assert_array_equal(tok[0, :4], LONG)
    np.testing.assert_array_equal(tok[1, :2], [B_, EOS])
    assert (tok[1, 2:] == PAD).all()


def test_top_k_1_equals_greedy():
    m, _ = markov(0, eos_bias=1.0)
    g = greedy(m, batch_size=3, max_len=12)
    s = sample(markov(0, eos_bias=1.0)[0], batch_size=3, max_len=12, top_k=1, rng=5)
    np.testing.assert_array_equal(s, g)


def test_temperature_to_zero_approaches_greedy():
    logits = np.random.default_rng(1).standard_normal((4, V))
    srt = np.sort(logits, axis=1)
    gap = srt[:, -1] - srt[:, -2]  # margin of the argmax
    prev = np.zeros(4)
    for T in [1.0, 0.3, 0.1, 0.03, 0.01, 0.001]:
        peak = sampling_distribution(logits, temperature=T)[np.arange(4), logits.argmax(1)]
        assert (peak >= prev).all()  # monotone in 1/T
        assert (1 - peak <= (V - 1) * np.exp(-gap / T) + 1e-12).all()  # bound on the mass off the argmax
        prev = peak
    assert (sampling_distribution(logits, temperature=0.5).max(1) > sampling_distribution(logits).max(1)).all()
    m, _ = markov(2, eos_bias=1.0)
    g = greedy(m, batch_size=2, max_len=10)
    np.testing.assert_array_equal(sample(markov(2, eos_bias=1.0)[0], batch_size=2, max_len=10, temperature=1e-4,
                                         rng=0), g)
    np.testing.assert_array_equal(sample(markov(2, eos_bias=1.0)[0], batch_size=2, max_len=10, temperature=0,
                                         rng=0), g)


def test_top_p_keeps_the_nucleus():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = np.log(probs)
    p = sampling_distribution(logits, top_p=0.7)
    np.testing.assert_allclose(p, [[0, 0.5 / 0.8, 0, 0.3 / 0.8]], atol=1e-12)
    p = sampling_distribution(logits, top_p=0.85)
    np.testing.assert_allclose(p, [[0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]], atol=1e-12)
    p = sampling_distribution(logits, top_p=0.1)  # at least the most likely id
    np.testing.assert_allclose(p, [[0, 1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(sampling_distribution(logits, top_p=1.0), probs, atol=1e-12)
    p = sampling_distribution(logits, top_k=2)
    np.testing.assert_allclose(p, [[0, 0.5 / 0.8, 0, 0.3 / 0.8]], atol=1e-12)


def test_sampling_frequencies_follow_the_filtered_distribution():
    first = dist(a=0.45, b=0.3, c=0.15, d=0.06)
    m = table_decoder({(BOS,): first}, default=dist(EOS=0.999))
    n = 20000
    toks = sample(m, batch_size=n, max_len=1, top_p=0.8, rng=np.random.default_rng(3))
    freq = np.bincount(toks[:, 0], minlength=V) / n
    expect = sampling_distribution(np.log(first)[None], top_p=0.8)[0]
    assert set(np.flatnonzero(freq)) == {A, B_, C}  # C completes the nucleus: 0.45 + 0.3 < 0.8
    np.testing.assert_allclose(freq, expect, atol=0.015)
    toks = sample(table_decoder({(BOS,): first}), batch_size=n, max_len=1, temperature=1.0, rng=4)
    np.testing.assert_allclose(np.bincount(toks[:, 0], minlength=V) / n, first, atol=0.015)


def test_sampling_is_seeded():
    a = sample(markov(3)[0], batch_size=4, max_len=15, rng=11)
    b = sample(markov(3)[0], batch_size=4, max_len=15, rng=11)
    c = sample(markov(3)[0], batch_size=4, max_len=15, rng=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_window_restarts_within_the_model_context():
    # a Markov model only looks at the last token, so a sliding window must not change the output
    full = sample(markov(4)[0], batch_size=3, max_len=20, rng=1, prefix=np.full((3, 2), A))
    m, _ = markov(4)
    windowed = sample(m, batch_size=3, max_len=20, rng=1, prefix=np.full((3, 2), A), window=5)
    np.testing.assert_array_equal(full, windowed)
    assert m.max_hist == 5
    g_full = greedy(markov(5)[0], batch_size=2, max_len=15, prefix=np.full((2, 1), B_))
    g_win = greedy(markov(5)[0], batch_size=2, max_len=15, prefix=np.full((2, 1), B_), window=3)
    np.testing.assert_array_equal(g_full, g_win)


def test_prefix_is_read_and_not_returned():
    table = {(C, D): dist(a=0.9), (C, D, A): dist(EOS=0.9)}
    out = greedy(table_decoder(table), prefix=np.array([[C, D]]), max_len=5)
    np.testing.assert_array_equal(out, [[A, EOS]])
    with pytest.raises(ValueError):
        greedy(table_decoder(table), max_len=5)  # no src, prefix or batch size
