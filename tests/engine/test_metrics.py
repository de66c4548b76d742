"""Metrics: token accuracy, exact match, perplexity by hand; corpus BLEU against sacrebleu."""
import math

import numpy as np
import pytest

from ndtrain.engine.metrics import (corpus_bleu, ids_to_text, perplexity, sequence_exact_match, tokenize_13a,
                                    token_accuracy_sums)

EOS = 3


def test_token_accuracy_ignores_pad():
    target = np.array([[5, 6, EOS, 0], [7, EOS, 0, 0]])
    pred = np.array([[5, 9, EOS, 4], [7, 4, 0, 8]])
    assert token_accuracy_sums(pred, target) == (3, 5)
    logits = np.eye(10)[pred] * 3.0  # (B, T, V): argmax is pred
    assert token_accuracy_sums(logits, target) == (3, 5)
    with pytest.raises(ValueError):
        token_accuracy_sums(pred[:, :3], target)


def test_exact_match_compares_up_to_eos():
    target = np.array([[5, 6, EOS, 0, 0],
                       [5, 6, EOS, 0, 0],
                       [5, 6, EOS, 0, 0],
                       [5, 6, EOS, 0, 0],
                       [5, 6, 7, 8, 9]])
    pred = np.array([[5, 6, EOS, 8, 8, 8],   # match: what follows EOS is ignored
                     [5, 6, 0, 0, 0, 0],     # no EOS: no match
                     [5, 6, 7, EOS, 0, 0],   # longer
                     [5, EOS, 0, 0, 0, 0],   # shorter
                     [5, 6, 7, 8, 9, 0]])    # target without EOS: equal tokens match
    np.testing.assert_array_equal(sequence_exact_match(pred, target), [True, False, False, False, True])
    np.testing.assert_array_equal(sequence_exact_match(pred[:, :3], target[:, :3]), [True, False, False, False, True])


def test_perplexity():
    assert perplexity(2 * math.log(7.0), 2) == pytest.approx(7.0)
    assert perplexity(1e6, 1) == float("inf")
    assert math.isnan(perplexity(0.0, 0))


def test_ids_to_text():
    itos = {4: "a", 5: "b", 6: "c", 1: "<unk>"}
    assert ids_to_text(np.array([2, 4, 1, 5, EOS, 6]), itos) == "a <unk> b"
    assert ids_to_text(np.array([4, 0, 6]), itos, sep="") == "ac"


WORDS = ["the", "a", "man", "dog", "runs", "in", "park", "red", "ball", "children", "play", "outside", "'s",
         "3.5", "1,000", "U.S.", "well-known", "2-3", "&amp;", "&quot;hi&quot;", "<skipped>", "(yes)", "x/y", "it.",
         "end,", "$5", "100%", "e-mail", "Mr.", "don't"]


def _corpus(seed, n, n_refs, noise):
    rng = np.random.default_rng(seed)
    refs = [[] for _ in range(n_refs)]
    hyps = []
    for _ in range(n):
        base = list(rng.choice(WORDS, size=rng.integers(1, 15)))
        for k in range(n_refs):
            r = [w for w in base if rng.random() > noise]
            r += list(rng.choice(WORDS, size=rng.integers(0, 3)))
            refs[k].append(" ".join(r) + rng.choice(["", ".", " .", "!", "  "]))
        h = [w if rng.random() > noise else str(rng.choice(WORDS)) for w in base if rng.random() > noise / 2]
        hyps.append(" ".join(h) + rng.choice(["", ".", " ?"]))
    return hyps, refs


@pytest.mark.parametrize("seed,n,n_refs,noise", [(0, 50, 1, 0.2), (1, 200, 1, 0.5), (2, 80, 3, 0.3),
                                                 (3, 30, 2, 0.9), (4, 10, 1, 0.0)])
def test_corpus_bleu_matches_sacrebleu(seed, n, n_refs, noise):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = _corpus(seed, n, n_refs, noise)
    ours = corpus_bleu(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, refs)
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.bp == pytest.approx(theirs.bp, abs=1e-12)
    assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert ours.counts == list(theirs.counts) and ours.totals == list(theirs.totals)
    assert ours.score > 0 or noise > 0.8


def test_corpus_bleu_edge_cases_match_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    cases = [
        (["the cat sat on the mat"], [["the cat sat on the mat"]]),           # perfect: 100
        (["the cat"], [["the cat sat on the mat"]]),                          # brevity penalty, exp smoothing
        (["zzz qqq"], [["the cat sat on the mat"]]),                          # no match: 0
        ([""], [["the cat"]]),                                                # empty hypothesis
        (["a b c d e", "x y"], [["a b c d e", "x y z"], ["a b c", None]]),    # variable number of references
        (["the cat sat"], [["the dog sat"], ["a cat sat down"]]),             # closest ref length, tie rule
        (["Hello, World!"], [["hello , world !"]]),                           # case-sensitive
    ]
    for hyps, refs in cases:
        ours, theirs = corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, refs)
        assert ours.score == pytest.approx(theirs.score, abs=1e-9), (hyps, refs)
        assert ours.ref_len == theirs.ref_len
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]).score == pytest.approx(100.0)
    low = corpus_bleu(["Hello, World!"], [["hello , world !"]], lowercase=True).score
    assert low == pytest.approx(sacrebleu.corpus_bleu(["Hello, World!"], [["hello , world !"]], lowercase=True).score)


def test_tokenize_13a_matches_sacrebleu():
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    tok = Tokenizer13a()
    for line in ["Hello, world. It costs $3.50 (about 1,000 yen)!", "well-known 2-3 a&amp;b &quot;q&quot;",
                 "end-\nof line<skipped>", "U.S.A. e-mail: x@y.com; {a} [b] ~c `d`"]:
        assert tokenize_13a(line) == tok(line)
    assert tokenize_13a("a,b") == "a , b"
