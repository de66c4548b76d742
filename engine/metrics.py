"""Evaluation metrics: token accuracy, sequence exact match, perplexity, corpus BLEU.

The array metrics come as *sums* (correct, count) so ranks' shares add up exactly; the trainer divides once at the
end. PAD (id 0) positions of a target never count.

corpus_bleu is our own implementation of sacrebleu's `corpus_bleu` with its defaults (13a tokenization, exp
smoothing, max n-gram order 4, closest reference length with ties to the shorter), written from sacrebleu 2.x's
source so the figures agree to the last bit (tests compare them on several corpora).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

# The fixed special ids of ndtrain.data.info (not imported: the engine does not depend on data/).
PAD, EOS = 0, 3


# -- token and sequence metrics ---------------------------------------------------------------------------------------
def token_accuracy_sums(pred: np.ndarray, target: np.ndarray, pad: int = PAD) -> tuple[int, int]:
    """pred, target: (B, T) ids (pred may be logits (B, T, V): argmax is taken). Returns (correct, count) over the
    non-PAD target positions."""
    pred = np.asarray(pred)
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(axis=-1)
    if pred.shape != target.shape:
        raise ValueError(f"token_accuracy: pred shape {pred.shape} != target shape {target.shape}")
    real = target != pad
    return int(np.count_nonzero((pred == target) & real)), int(np.count_nonzero(real))


def _upto_eos(row: np.ndarray, eos: int) -> np.ndarray:
    hits = np.flatnonzero(row == eos)
    return row[:hits[0] + 1] if hits.size else row


def sequence_exact_match(pred: np.ndarray, target: np.ndarray, pad: int = PAD, eos: int = EOS) -> np.ndarray:
    """(B,) bool: does each predicted sequence equal its target?

    Both are compared up to and including their first EOS (what follows an EOS is ignored); PAD positions of the
    target are dropped and trailing PAD of the prediction is stripped (decoders pad finished rows). A prediction
    that never emits EOS cannot match a target that has one. pred: (B, L), target: (B, T), L and T may differ.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"sequence_exact_match: {pred.shape[0]} predictions for {target.shape[0]} targets")
    out = np.zeros(pred.shape[0], dtype=bool)
    for i in range(pred.shape[0]):
        t = _upto_eos(target[i], eos)
        t = t[t != pad]
        p = _upto_eos(pred[i], eos)
        nz = np.flatnonzero(p != pad)
        p = p[:nz[-1] + 1] if nz.size else p[:0]
        out[i] = p.shape == t.shape and bool(np.all(p == t))
    return out


def perplexity(loss_sum: float, count: float) -> float:
    """exp(mean negative log-likelihood per token); inf when it overflows, nan for no tokens."""
    if count <= 0:
        return float("nan")
    mean = loss_sum / count
    return math.exp(mean) if mean < 700 else float("inf")


# -- BLEU -------------------------------------------------------------------------------------------------------------
_13A_RULES = [
    # language-dependent part (assuming Western languages): punctuation and symbols become tokens
    (re.compile(r'([\{-\~\[-\` -\&\(-\+\:-\@\/])'), r' \1 '),
    # period and comma, unless preceded by a digit
    (re.compile(r'([^0-9])([\.,])'), r'\1 \2 '),
    # period and comma, unless followed by a digit
    (re.compile(r'([\.,])([^0-9])'), r' \1 \2'),
    # dash, when preceded by a digit
    (re.compile(r'([0-9])(-)'), r'\1 \2 '),
]


@lru_cache(maxsize=2 ** 16)
def tokenize_13a(line: str) -> str:
    """mteval-v13a's tokenization, as sacrebleu's Tokenizer13a: unescape a few entities, split punctuation."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for rx, repl in _13A_RULES:
        line = rx.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


@dataclass
class BLEUScore:
    score: float  # 0..100
    counts: list = field(default_factory=list)  # matched n-grams per order
    totals: list = field(default_factory=list)  # hypothesis n-grams per order
    precisions: list = field(default_factory=list)  # percent, smoothed
    bp: float = 1.0
    sys_len: int = 0
    ref_len: int = 0


def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    best_diff, best = -1, -1
    for r in ref_lens:
        diff = abs(hyp_len - r)
        if best_diff == -1 or diff < best_diff or (diff == best_diff and r < best):
            best_diff, best = diff, r
    return best


def _log(x: float) -> float:
    return -9999999999 if x == 0.0 else math.log(x)  # sacrebleu's my_log: a zero precision floors the score


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str],
                lowercase: bool = False, max_order: int = 4) -> BLEUScore:
    """Corpus BLEU (Papineni et al., 2002) exactly as sacrebleu.corpus_bleu(hypotheses, references) computes it.

    references: reference *streams*, sacrebleu's layout: references[k][i] is the k-th reference of segment i (a
    plain list of strings is taken as one stream). None entries mean "no k-th reference for this segment".
    Smoothing 'exp' (NIST): the n-th order with no match gets precision 100 / (2^k * total), k counting such orders.
    """
    return _bleu_from_stats(*bleu_stats(hypotheses, references, lowercase, max_order), max_order)


def bleu_stats(hypotheses: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str],
               lowercase: bool = False, max_order: int = 4) -> tuple[list[int], list[int], int, int]:
    """corpus_bleu's sufficient statistics (matched n-grams per order, hypothesis n-grams per order, hypothesis
    length, closest reference length): sums over segments, so ranks' shares of a corpus add up exactly and
    bleu_from_sums gives the corpus BLEU of their union."""
    if len(references) and isinstance(references[0], str):
        references = [references]
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        refs = [r[i] for r in references if r[i] is not None]
        ref_counts: Counter | None = None
        ref_lens = []
        for r in refs:
            r = r.lower() if lowercase else r
            toks = tokenize_13a(r.rstrip()).split()
            ref_lens.append(len(toks))
            c = _ngrams(toks, max_order)
            if ref_counts is None:
                ref_counts = c
            else:
                for g, n in c.items():
                    ref_counts[g] = max(ref_counts[g], n)
        h = hyp.lower() if lowercase else hyp
        htoks = tokenize_13a(h.rstrip()).split()
        sys_len += len(htoks)
        ref_len += _closest_ref_len(len(htoks), ref_lens)
        for g, n in _ngrams(htoks, max_order).items():
            total[len(g) - 1] += n
            if ref_counts is not None and g in ref_counts:
                correct[len(g) - 1] += min(n, ref_counts[g])
    return correct, total, sys_len, ref_len



def bleu_sums(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> dict[str, float]:
    """bleu_stats as a flat dict of floats for metric sums: bleu_correct_n, bleu_total_n, bleu_sys_len, bleu_ref_len."""
    correct, total, sys_len, ref_len = bleu_stats(hypotheses, references, max_order=max_order)
    out = {f"bleu_correct_{n + 1}": float(c) for n, c in enumerate(correct)}
    out.update({f"bleu_total_{n + 1}": float(t) for n, t in enumerate(total)})
    out.update({"bleu_sys_len": float(sys_len), "bleu_ref_len": float(ref_len)})
    return out


def bleu_from_sums(sums: dict, max_order: int = 4) -> BLEUScore:
    """The corpus BLEU of summed bleu_sums records (equal to corpus_bleu over all their segments together)."""
    correct = [int(sums[f"bleu_correct_{n}"]) for n in range(1, max_order + 1)]
    total = [int(sums[f"bleu_total_{n}"]) for n in range(1, max_order + 1)]
    return _bleu_from_stats(correct, total, int(sums["bleu_sys_len"]), int(sums["bleu_ref_len"]), max_order)


def _bleu_from_stats(correct, total, sys_len, ref_len, max_order) -> BLEUScore:
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return BLEUScore(0.0, correct, total, precisions, bp, sys_len, ref_len)
    smooth = 1.0
    for n in range(1, max_order + 1):
        if total[n - 1] == 0:
            break
        if correct[n - 1] == 0:
            smooth *= 2
            precisions[n - 1] = 100.0 / (smooth * total[n - 1])
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    score = bp * math.exp(sum([_log(p) for p in precisions]) / max_order)
    return BLEUScore(score, correct, total, precisions, bp, sys_len, ref_len)


def ids_to_text(ids: np.ndarray, itos: Sequence[str] | dict, sep: str = " ", pad: int = PAD, eos: int = EOS,
                skip: Sequence[int] = (2,)) -> str:
    """One row of ids -> text for BLEU: stops at EOS, drops PAD and the given specials (BOS by default)."""
    out = []
    for t in np.asarray(ids).tolist():
        if t == eos:
            break
        if t == pad or t in skip:
            continue
        out.append(itos[t])
    return sep.join(out)


__all__ = ["token_accuracy_sums", "sequence_exact_match", "perplexity", "tokenize_13a", "corpus_bleu", "BLEUScore",
           "bleu_stats", "bleu_sums", "bleu_from_sums",
           "ids_to_text"]
