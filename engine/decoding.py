"""Decoding (greedy, beam search, sampling) written once against the IncrementalDecoder protocol, so the
Transformer models and the RNN seq2seq models share it.

Every algorithm returns the *generated* tokens only (not the prefix), (B, L) int32 with L <= max_len: a row ends
with EOS (then PAD up to L) unless it reached max_len first. Decoding stops as soon as every row has finished.

    tokens = greedy(model, src, max_len=20)                       # seq2seq: prefix defaults to a BOS column
    tokens = sample(lm, prefix=prompt, max_len=200, top_p=0.9, rng=0, window=64)   # LM: give a prompt
    tokens, scores = beam_search(model, src, beam_size=4, max_len=20, alpha=0.6)
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

# The fixed special ids of ndtrain.data.info (not imported: the engine does not depend on data/).
PAD, BOS, EOS = 0, 2, 3


class IncrementalDecoder(Protocol):
    """What a model offers to the decoding algorithms. `state` is opaque to them (a KV cache, RNN hidden states).

    start(src)            src: (B, S) int32 source ids (PAD = 0) for seq2seq, or None for a language model with
                          `batch_size` rows; encodes once and returns the initial state.
    step(tokens, state)   tokens: (B, t) int32, the new tokens (t = 1 while decoding; a prompt may be longer).
                          Returns (logits (B, V) of the last new position, new state). With a KV cache the logits
                          equal those of a full recompute over all tokens so far.
    reorder(state, idx)   idx: (B',) int64 rows to keep/repeat (beam search); returns the selected state.
    """

    def start(self, src: np.ndarray | None, batch_size: int | None = None) -> Any: ...

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...

    def reorder(self, state: Any, idx: np.ndarray) -> Any: ...


# -- shared helpers ---------------------------------------------------------------------------------------------------
def _batch_size(src, prefix, batch_size) -> int:
    for arr in (src, prefix):
        if arr is not None:
            return int(np.shape(arr)[0])
    if batch_size is None:
        raise ValueError("decoding: give src, prefix or batch_size (a language model needs a batch size)")
    return int(batch_size)


def _prefix(src, prefix, batch_size, bos) -> np.ndarray:
    """(B, P) int32: the given prefix, or a BOS column."""
    B = _batch_size(src, prefix, batch_size)
    if prefix is None:
        return np.full((B, 1), bos, dtype=np.int32)
    prefix = np.asarray(prefix, dtype=np.int32)
    if prefix.ndim != 2 or prefix.shape[1] == 0:
        raise ValueError(f"decoding: prefix must be (B, P) with P >= 1, got shape {prefix.shape}")
    return prefix


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """(N, V) -> (N, V) float64 log-probabilities (scores are accumulated in float64 whatever the model dtype)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _finish(out: list[np.ndarray], B: int) -> np.ndarray:
    return np.stack(out, axis=1).astype(np.int32) if out else np.zeros((B, 0), dtype=np.int32)


class _Stepper:
    """Feeds one new token per row; with `window` (a model with at most `window` positions, e.g. learned position
    embeddings) it restarts from the last `window` tokens once the context is full, as nanoGPT's generate() crops
    its input. Without a window every step is incremental (KV cache / RNN state)."""

    def __init__(self, model, src, prefix: np.ndarray, window: int | None):
        self.model, self.src, self.window = model, src, window
        self.B = prefix.shape[0]
        self.context = prefix  # (B, n): everything fed so far (only kept when a window is set)
        self.state = model.start(src, batch_size=self.B)
        feed = prefix if window is None else prefix[:, -window:]
        self.logits, self.state = model.step(feed, self.state)

    def feed(self, tok: np.ndarray) -> np.ndarray:
        col = tok.astype(np.int32)[:, None]  # (B, 1)
        if self.window is None:
            self.logits, self.state = self.model.step(col, self.state)
            return self.logits
        self.context = np.concatenate([self.context, col], axis=1)
        if self.context.shape[1] <= self.window:
            self.logits, self.state = self.model.step(col, self.state)
        else:
            self.state = self.model.start(self.src, batch_size=self.B)
            self.logits, self.state = self.model.step(self.context[:, -self.window:], self.state)
        return self.logits


def _decode(model, src, prefix, batch_size, max_len, bos, eos, window, pick) -> np.ndarray:
    """The loop greedy and sampling share: `pick(logits (B, V)) -> (B,)` chooses the next tokens."""
    prefix = _prefix(src, prefix, batch_size, bos)
    B = prefix.shape[0]
    stepper = _Stepper(model, src, prefix, window)
    finished = np.zeros(B, dtype=bool)
    out: list[np.ndarray] = []
    for t in range(max_len):
        tok = pick(stepper.logits).astype(np.int64)
        tok[finished] = PAD
        out.append(tok)
        finished |= tok == eos
        if finished.all() or t == max_len - 1:
            break  # no step after the last token: it may not fit the model's positions
        stepper.feed(np.where(finished, eos, tok))  # finished rows keep feeding EOS (their output is ignored)
    return _finish(out, B)


# -- greedy -----------------------------------------------------------------------------------------------------------
def greedy(model: IncrementalDecoder, src: np.ndarray | None = None, *, max_len: int,
           prefix: np.ndarray | None = None, batch_size: int | None = None, bos: int = BOS, eos: int = EOS,
           window: int | None = None) -> np.ndarray:
    """Argmax at every step (ties: the lowest id). Returns (B, L) int32, L <= max_len."""
    return _decode(model, src, prefix, batch_size, max_len, bos, eos, window, lambda lg: np.argmax(lg, axis=-1))


# -- sampling ---------------------------------------------------------------------------------------------------------
def sampling_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None) -> np.ndarray:
    """logits (B, V) -> probabilities (B, V) float64 after temperature, top-k and top-p (in that order, as in
    HF transformers' warpers).

    top_k  keeps the k most likely ids (ties broken towards the lower id, as argmax does: top_k=1 is greedy).
    top_p  (Holtzman et al., 2020) keeps the smallest set of most likely ids whose probability sums to >= p
           (always at least one id); the kept probabilities are renormalized.
    temperature <= 0 gives the one-hot argmax distribution.
    """
    z = np.asarray(logits, dtype=np.float64)
    B, V = z.shape
    if temperature <= 0:
        probs = np.zeros((B, V))
        probs[np.arange(B), np.argmax(z, axis=-1)] = 1.0
        return probs
    z = z / temperature
    order = np.argsort(-z, axis=-1, kind="stable")  # (B, V) most likely first, lower id first on ties
    keep_sorted = np.ones((B, V), dtype=bool)
    if top_k is not None and 0 < top_k < V:
        keep_sorted[:, top_k:] = False
    zs = np.take_along_axis(z, order, axis=-1)
    zs = np.where(keep_sorted, zs, -np.inf)
    ps = np.exp(zs - zs[:, :1])  # the first sorted id is always kept: its logit is the max
    ps /= ps.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        before = np.cumsum(ps, axis=-1) - ps  # probability mass strictly ahead of each id
        keep_sorted &= before < top_p
        keep_sorted[:, 0] = True
        ps = np.where(keep_sorted, ps, 0.0)
        ps /= ps.sum(axis=-1, keepdims=True)
    probs = np.zeros((B, V))
    np.put_along_axis(probs, order, ps, axis=-1)
    return probs


def sample(model: IncrementalDecoder, src: np.ndarray | None = None, *, max_len: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, rng: np.random.Generator | int | None = None,
           prefix: np.ndarray | None = None, batch_size: int | None = None, bos: int = BOS, eos: int = EOS,
           window: int | None = None) -> np.ndarray:
    """Ancestral sampling from `sampling_distribution` (inverse CDF with one uniform per row and step, from `rng`,
    a Generator or a seed: the same seed gives the same text). Returns (B, L) int32."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def pick(logits):
        probs = sampling_distribution(logits, temperature, top_k, top_p)
        if temperature <= 0:
            return np.argmax(probs, axis=-1)
        cdf = np.cumsum(probs, axis=-1)
        u = gen.random((probs.shape[0], 1)) * cdf[:, -1:]
        tok = (cdf <= u).sum(axis=-1)  # first id whose cdf exceeds u
        return np.minimum(tok, probs.shape[1] - 1)

    return _decode(model, src, prefix, batch_size, max_len, bos, eos, window, pick)


# -- beam search ------------------------------------------------------------------------------------------------------
def length_penalty(length: int, alpha: float, kind: str = "gnmt") -> float:
    """The divisor of a hypothesis' log-probability.

    gnmt     ((5 + length) / 6) ** alpha   (Wu et al., 2016; Vaswani et al. used alpha = 0.6)
    fairseq  length ** alpha               (fairseq's --lenpen; alpha = 1 is the mean log-probability per token)
    `length` counts the generated tokens including the final EOS. alpha = 0 ranks by raw log-probability.
    """
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if kind == "fairseq":
        return float(length) ** alpha
    raise ValueError(f"length_penalty: kind must be 'gnmt' or 'fairseq', got {kind!r}")


def beam_search(model: IncrementalDecoder, src: np.ndarray | None = None, *, beam_size: int = 4, max_len: int,
                alpha: float = 0.6, penalty: str = "gnmt", n_best: int = 1, prefix: np.ndarray | None = None,
                batch_size: int | None = None, bos: int = BOS, eos: int = EOS):
    """Beam search as in fairseq's SequenceGenerator.

    Each step scores every (beam, next id) extension by its summed log-probability and takes the best 2K (K =
    beam_size). An extension ending in EOS that ranks among the best K is *finished*: it leaves the beam with score
    logprob / length_penalty(length) and is kept. The best K extensions not ending in EOS form the next beam, so
    the beam stays full. A row stops once it holds K finished hypotheses; at max_len the live hypotheses are
    finished as they are (without EOS). The answer is the finished hypothesis with the best normalized score.

    Returns (tokens, scores): tokens (B, L) int32 and scores (B,) float64 for n_best = 1, else (B, n_best, L) and
    (B, n_best).
    """
    K = int(beam_size)
    if not 1 <= n_best <= K:
        raise ValueError(f"beam_search: need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={K}")
    prefix = _prefix(src, prefix, batch_size, bos)
    B = prefix.shape[0]
    state = model.start(src, batch_size=B)
    logits, state = model.step(prefix, state)  # (B, V): encode and read the prefix once per row, then expand
    rows = np.repeat(np.arange(B), K)  # (B*K,)
    state = model.reorder(state, rows)
    logp = log_softmax64(logits)[rows]  # (B*K, V)
    V = logp.shape[1]
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # only the first copy of each row is live at the start
    hist = np.zeros((B * K, 0), dtype=np.int64)  # generated tokens of each live hypothesis
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]  # (norm score, logprob, tokens)
    done = np.zeros(B, dtype=bool)
    n_cand = min(2 * K, K * V)

    for t in range(1, max_len + 1):
        cand = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)  # (B, K*V)
        top = np.argsort(-cand, axis=-1, kind="stable")[:, :n_cand]  # (B, 2K) best first, ties to lower index
        new_scores = np.full((B, K), -np.inf)
        new_src = np.repeat(np.arange(B)[:, None] * K, K, axis=1)  # (B, K) global row each new beam extends
        new_tok = np.full((B, K), PAD, dtype=np.int64)
        for b in range(B):
            if done[b]:
                continue
            n_alive = 0
            for j, flat in enumerate(top[b]):
                s = cand[b, flat]
                if s == -np.inf:
                    break
                beam, tok = divmod(int(flat), V)
                if tok == eos:
                    if j < K and len(finished[b]) < K:
                        toks = hist[b * K + beam].tolist() + [eos]
                        finished[b].append((s / length_penalty(t, alpha, penalty), s, toks))
                    continue
                if n_alive < K:
                    new_scores[b, n_alive], new_src[b, n_alive], new_tok[b, n_alive] = s, b * K + beam, tok
                    n_alive += 1
            if len(finished[b]) >= K:
                done[b] = True
            elif t == max_len:  # out of length: the live hypotheses end here, without EOS
                for k in range(n_alive):
                    toks = hist[new_src[b, k]].tolist() + [int(new_tok[b, k])]
                    finished[b].append((new_scores[b, k] / length_penalty(t, alpha, penalty), new_scores[b, k], toks))
                done[b] = True
        if done.all():
            break
        src_rows = new_src.reshape(-1)
        hist = np.concatenate([hist[src_rows], new_tok.reshape(-1, 1)], axis=1)
        scores = new_scores
        state = model.reorder(state, src_rows)
        logits, state = model.step(new_tok.reshape(-1, 1).astype(np.int32), state)
        logp = log_softmax64(logits)

    best = []
    for b in range(B):
        hyps = sorted(finished[b], key=lambda h: -h[0])  # stable: earlier-finished first on ties
        best.append(hyps[:n_best])
    L = max((len(h[2]) for hyps in best for h in hyps), default=0)
    tokens = np.full((B, n_best, L), PAD, dtype=np.int32)
    out_scores = np.full((B, n_best), -np.inf)
    for b, hyps in enumerate(best):
        for i, (score, _, toks) in enumerate(hyps):
            tokens[b, i, :len(toks)] = toks
            out_scores[b, i] = score
    if n_best == 1:
        return tokens[:, 0], out_scores[:, 0]
    return tokens, out_scores


__all__ = ["IncrementalDecoder", "greedy", "sample", "sampling_distribution", "beam_search", "length_penalty",
           "log_softmax64"]
