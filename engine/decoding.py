"""Decoding (greedy, beam search, sampling) written once against the IncrementalDecoder protocol, so the
Transformer models and the RNN seq2seq models share it.

Every algorithm returns the *generated* tokens only (not the prefix), (B, L) int32 with L <= max_len: a row ends
with EOS (then PAD up to L) unless it reached max_len first. Decoding stops as soon as every row has finished.

    tokens = greedy(model, src, max_len=20)                       # seq2seq: prefix defaults to a BOS column
    tokens = sample(lm, prefix=prompt, max_len=200, top_p=0.9, rng=0, window=64)   # LM: give a prompt
    tokens, scores = beam_search(model, src, beam_size=4, max_len=20, alpha=0.6)   # batched across sentences
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
    reorder_same_source(state, idx)   optional: reorder() for an idx that only moves rows among the hypotheses of
                          one source sentence (the source-side state may then stay as it is).
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

    def __init__(self, model, src, prefix: np.ndarray, window: int | None, start_state=None):
        self.model, self.src, self.window = model, src, window
        self.B = prefix.shape[0]
        self.context = prefix  # (B, n): everything fed so far (only kept when a window is set)
        self.state = model.start(src, batch_size=self.B) if start_state is None else start_state
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

    def keep(self, rows: np.ndarray) -> None:
        """Continue with these rows only (the others have finished)."""
        self.state = self.model.reorder(self.state, rows)
        self.logits = self.logits[rows]
        self.context = self.context[rows]
        self.src = None if self.src is None else np.asarray(self.src)[rows]
        self.B = len(rows)


# Greedy decoding drops its finished rows from the batch once this share of the rows still in it has finished (each
# drop copies the decoding state of the rows that stay).
COMPACT_SHARE = 0.25


def _decode(model, src, prefix, batch_size, max_len, bos, eos, window, pick, start_state=None,
            compact: bool = False) -> np.ndarray:
    """The loop greedy and sampling share: `pick(logits (b, V)) -> (b,)` chooses the next tokens of the b rows in
    the batch. compact=True (a pick that treats every row alone, as argmax): finished rows leave the batch
    (COMPACT_SHARE); otherwise they keep feeding EOS (sampling: its random stream stays what it was)."""
    prefix = _prefix(src, prefix, batch_size, bos)
    B = prefix.shape[0]
    stepper = _Stepper(model, src, prefix, window, start_state)
    finished = np.zeros(B, dtype=bool)
    live = np.arange(B)  # the rows still in the batch
    out: list[np.ndarray] = []
    for t in range(max_len):
        tok = np.full(B, PAD, dtype=np.int64)
        tok[live] = pick(stepper.logits)
        tok[finished] = PAD
        out.append(tok)
        finished |= tok == eos
        if finished.all() or t == max_len - 1:
            break  # no step after the last token: it may not fit the model's positions
        done = finished[live]
        if compact and done.sum() >= COMPACT_SHARE * len(live):
            stay = np.flatnonzero(~done)
            stepper.keep(stay)
            live = live[stay]
        stepper.feed(np.where(finished[live], eos, tok[live]))  # finished rows still in the batch feed EOS
    return _finish(out, B)


# -- greedy -----------------------------------------------------------------------------------------------------------
def greedy(model: IncrementalDecoder, src: np.ndarray | None = None, *, max_len: int,
           prefix: np.ndarray | None = None, batch_size: int | None = None, bos: int = BOS, eos: int = EOS,
           window: int | None = None, start_state=None) -> np.ndarray:
    """Argmax at every step (ties: the lowest id); finished rows leave the batch. Returns (B, L) int32,
    L <= max_len. start_state: what
    model.start(src) would return, when the caller has it already (a seq2seq eval that encoded src once)."""
    return _decode(model, src, prefix, batch_size, max_len, bos, eos, window, lambda lg: np.argmax(lg, axis=-1),
                   start_state, compact=True)


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


# Candidate scores a group of sentences may hold at once: (rows * K, V) float64 log-probabilities and the (rows,
# K * V) candidate matrix; 2^22 elements = 32 MB each. Larger batches are searched group by group.
BEAM_GROUP_ELEMS = 1 << 22


def beam_search(model: IncrementalDecoder, src: np.ndarray | None = None, *, beam_size: int = 4, max_len: int,
                alpha: float = 0.6, penalty: str = "gnmt", n_best: int = 1, prefix: np.ndarray | None = None,
                batch_size: int | None = None, bos: int = BOS, eos: int = EOS, group: int | None = None,
                start_state=None):
    """Beam search as in fairseq's SequenceGenerator, batched across sentences.

    Each step scores every (beam, next id) extension by its summed log-probability and takes the best 2K (K =
    beam_size). An extension ending in EOS that ranks among the best K is *finished*: it leaves the beam with score
    logprob / length_penalty(length) and is kept. The best K extensions not ending in EOS form the next beam, so
    the beam stays full. A row stops once it holds K finished hypotheses; at max_len the live hypotheses are
    finished as they are (without EOS). The answer is the finished hypothesis with the best normalized score.

    All rows advance together: one model.step over the (rows * K) live hypotheses per step, the selection done with
    array operations for all rows at once; a row that is done leaves the batch (its cache rows are dropped), so the
    step shrinks as sentences finish. `group` sentences at most are searched at once (default: as many as keep the
    candidate arrays under BEAM_GROUP_ELEMS). The result equals searching each sentence alone.

    start_state: what model.start(src) would return, when the caller has it already (a seq2seq eval that encoded
    src once for its teacher-forced pass); the groups take their rows of it (model.reorder).

    Returns (tokens, scores): tokens (B, L) int32 and scores (B,) float64 for n_best = 1, else (B, n_best, L) and
    (B, n_best).
    """
    K = int(beam_size)
    if K < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {K}")
    if not 1 <= n_best <= K:
        raise ValueError(f"beam_search: need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={K}")
    prefix = _prefix(src, prefix, batch_size, bos)
    B = prefix.shape[0]
    if group is None:
        V = getattr(getattr(model, "cfg", None), "tgt_vocab", None) or getattr(getattr(model, "cfg", None),
                                                                              "vocab_size", None) or 1024
        group = max(1, BEAM_GROUP_ELEMS // (K * V))
    best: list[list[tuple[float, float, list[int]]]] = []
    for g0 in range(0, B, group):
        g1 = min(B, g0 + group)
        g_src = None if src is None else np.asarray(src)[g0:g1]
        g_state = start_state
        if start_state is not None and (g0, g1) != (0, B):
            g_state = model.reorder(start_state, np.arange(g0, g1))
        best += _beam_group(model, g_src, prefix[g0:g1], K, max_len, alpha, penalty, n_best, eos, g_state)
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


def _logsumexp64(z: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """(N, V) -> (N,) float64 log sum exp over each row (the exps summed in z's own dtype: no float64 copy of the
    (N, V) logits), by cache-sized row blocks (one read of z from memory). m: the row maxima (N,), if known."""
    N, V = z.shape
    if m is None:
        m = z.max(axis=-1)
    s = np.empty(N, dtype=z.dtype)
    R = max(1, LSE_BLOCK_ELEMS // max(V, 1))
    buf = np.empty((min(R, N), V), dtype=z.dtype)
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        e = np.subtract(z[r0:r1], m[r0:r1, None], out=buf[:r1 - r0])
        np.exp(e, out=e)
        s[r0:r1] = e.sum(axis=-1)
    return m.astype(np.float64) + np.log(s.astype(np.float64))


# Elements per row block of _logsumexp64's pass (128K float32 = 512 KB: the L2 cache), and the chunk width of the
# top-token search (_top_tokens): a row of V logits is seen as V / TOP_CHUNK chunks.
LSE_BLOCK_ELEMS = 131072
TOP_CHUNK = 64


def _top_tokens(z: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The c largest logits of each row of z (N, V): (token ids (N, c) unordered, row maxima (N,)).

    Not by a selection over all V (np.argpartition costs as much as the output GEMM at V = 8,000): the row is cut
    into chunks of TOP_CHUNK ids, each chunk's max is taken (one reduction pass, which also gives the row max), and
    the c best tokens are selected among the tokens of the c chunks with the largest maxima. That is exact: each of
    the c best tokens lies in a chunk whose max is at least the c-th best value, and at most c chunks have such a
    max. (Values tied with the c-th best may be taken in any order, as np.argpartition does.)"""
    N, V = z.shape
    G = TOP_CHUNK
    nb = V // G
    if c >= V or nb <= c:  # a short row: select over all of it
        tok = (np.argpartition(-z, c - 1, axis=-1)[:, :c] if c < V
               else np.broadcast_to(np.arange(V), z.shape).copy())
        return tok, z.max(axis=-1)
    main = z[:, :nb * G].reshape(N, nb, G)  # a view (z is C-contiguous)
    cmax = main.max(axis=2)  # (N, nb)
    tail = z[:, nb * G:]  # (N, V - nb*G) ids past the last whole chunk: always candidates
    m = cmax.max(axis=1)
    if tail.shape[1]:
        m = np.maximum(m, tail.max(axis=1))
    ch = np.argpartition(-cmax, c - 1, axis=1)[:, :c]  # (N, c) the chunks with the c largest maxima
    vals = main[np.arange(N)[:, None], ch].reshape(N, c * G)  # their logits
    ids = (ch[:, :, None] * G + np.arange(G)).reshape(N, c * G)
    if tail.shape[1]:
        vals = np.concatenate([vals, tail], axis=1)
        ids = np.concatenate([ids, np.broadcast_to(np.arange(nb * G, V), tail.shape)], axis=1)
    pick = np.argpartition(-vals, c - 1, axis=1)[:, :c]
    return np.take_along_axis(ids, pick, axis=1), m


def _candidates(scores: np.ndarray, logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best extensions of each row's K hypotheses: scores (A, K) summed log-probabilities, logits (A*K, V)
    of the next token. Returns (values (A, n) float64, flat ids (A, n) = beam * V + token), best first, ties to the
    lower flat id - what a stable sort of all K * V sums gives, without forming them.

    The logits are seen as chunks of TOP_CHUNK ids (as _top_tokens): a chunk's best extension scores
    score + chunk max - logsumexp, so the n best extensions of a row lie in the n chunks (of all K * V / TOP_CHUNK)
    with the best such scores; only those chunks' log-probabilities are computed. (Values tied with the n-th best
    may be taken in any order, as np.argpartition does.)"""
    A, K = scores.shape
    z = np.ascontiguousarray(logits)
    V = z.shape[1]
    G = TOP_CHUNK
    nb = V // G
    if K * nb <= n:  # short rows: each hypothesis' best n tokens, from all of its row
        tok, m = _top_tokens(z, min(n, V))
        logp = np.take_along_axis(z, tok, axis=-1).astype(np.float64) - _logsumexp64(z, m)[:, None]
        cand = (scores.reshape(A * K, 1) + logp).reshape(A, -1)
        flat = (np.arange(K)[None, :, None] * V + tok.reshape(A, K, -1)).reshape(A, -1)
    else:
        main = z[:, :nb * G].reshape(A * K, nb, G)  # a view (z is C-contiguous)
        cmax = main.max(axis=2)  # (A*K, nb)
        tail = z[:, nb * G:]  # (A*K, V - nb*G): ids past the last whole chunk, always candidates
        m = cmax.max(axis=1)
        if tail.shape[1]:
            m = np.maximum(m, tail.max(axis=1))
        lse = _logsumexp64(z, m)  # (A*K,)
        base = scores.reshape(A * K, 1)
        best = (base + (cmax.astype(np.float64) - lse[:, None])).reshape(A, K * nb)  # each chunk's best extension
        ch = np.argpartition(-best, n - 1, axis=1)[:, :n]  # (A, n) over beam * nb + chunk
        beam, chunk = np.divmod(ch, nb)
        rows = np.arange(A)[:, None] * K + beam  # (A, n) rows of z
        vals = main[rows, chunk]  # (A, n, G) logits of the chosen chunks
        cand = (base[rows, 0][..., None] + (vals.astype(np.float64) - lse[rows][..., None])).reshape(A, n * G)
        flat = (beam[..., None] * V + chunk[..., None] * G + np.arange(G)).reshape(A, n * G)
        if tail.shape[1]:
            t_cand = (base + (tail.astype(np.float64) - lse[:, None])).reshape(A, -1)
            t_flat = (np.arange(K)[:, None] * V + np.arange(nb * G, V)).reshape(1, -1)
            cand = np.concatenate([cand, t_cand], axis=1)
            flat = np.concatenate([flat, np.broadcast_to(t_flat, (A, t_flat.shape[1]))], axis=1)
        if cand.shape[1] > n:
            part = np.argpartition(-cand, n - 1, axis=1)[:, :n]
            cand, flat = np.take_along_axis(cand, part, axis=1), np.take_along_axis(flat, part, axis=1)
    order = np.lexsort((flat, -cand), axis=-1)[:, :min(n, cand.shape[1])]  # by value, then by flat id
    return np.take_along_axis(cand, order, axis=-1), np.take_along_axis(flat, order, axis=-1)


def _beam_group(model, src, prefix, K, max_len, alpha, penalty, n_best, eos, state=None):
    """Beam search over the rows of one group (state: model.start(src), if the caller has it); returns per row its
    n_best (norm score, logprob, tokens), best first."""
    B = prefix.shape[0]
    if state is None:
        state = model.start(src, batch_size=B)
    logits, state = model.step(prefix, state)  # (B, V): encode and read the prefix once per row, then expand
    rows = np.repeat(np.arange(B), K)  # (B*K,)
    state = model.reorder(state, rows)
    logits = logits[rows]  # (B*K, V)
    V = logits.shape[1]
    active = np.arange(B)  # the group's rows still searching, (A,)
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # only the first copy of each row is live at the start
    hist = np.zeros((B * K, 0), dtype=np.int64)  # generated tokens of each live hypothesis, (A*K, t-1)
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]  # (norm score, logprob, tokens)
    n_fin = np.zeros(B, dtype=np.int64)
    n_cand = min(2 * K, K * V)
    rank = np.arange(n_cand)

    for t in range(1, max_len + 1):
        A = active.size
        lp = length_penalty(t, alpha, penalty)
        cs, top = _candidates(scores, logits, n_cand)  # (A, 2K) best first: scores, flat ids beam * V + token
        beam, tok = np.divmod(top, V)
        valid = cs > -np.inf
        # finished: EOS extensions among the best K, in rank order, while the row holds fewer than K
        eos_top = valid & (tok == eos) & (rank < K)
        fin = eos_top & (np.cumsum(eos_top, axis=1) <= (K - n_fin[active])[:, None])
        for a, j in zip(*np.nonzero(fin)):
            s = float(cs[a, j])
            finished[active[a]].append((s / lp, s, hist[a * K + beam[a, j]].tolist() + [eos]))
        n_fin[active] += fin.sum(axis=1)
        # the next beam: the best K extensions not ending in EOS
        alive = valid & (tok != eos)
        alive_rank = np.cumsum(alive, axis=1)
        take = alive & (alive_rank <= K)
        new_scores = np.full((A, K), -np.inf)
        new_src = np.repeat(np.arange(A)[:, None] * K, K, axis=1)  # (A, K) the live row each new beam extends
        new_tok = np.full((A, K), PAD, dtype=np.int64)
        ai, ji = np.nonzero(take)
        slot = alive_rank[ai, ji] - 1
        new_scores[ai, slot] = cs[ai, ji]
        new_src[ai, slot] = ai * K + beam[ai, ji]
        new_tok[ai, slot] = tok[ai, ji]
        searching = n_fin[active] < K
        if t == max_len:  # out of length: the live hypotheses end here, without EOS
            n_alive = take.sum(axis=1)
            for a in np.flatnonzero(searching):
                for k in range(n_alive[a]):
                    toks = hist[new_src[a, k]].tolist() + [int(new_tok[a, k])]
                    finished[active[a]].append((new_scores[a, k] / lp, new_scores[a, k], toks))
            break
        keep = np.flatnonzero(searching)
        if keep.size == 0:
            break
        active = active[keep]
        src_rows = new_src[keep].reshape(-1)  # (A'*K,) rows of the current hypotheses to continue
        feed = new_tok[keep].reshape(-1, 1)
        hist = np.concatenate([hist[src_rows], feed], axis=1)
        scores = new_scores[keep]
        if keep.size == A and hasattr(model, "reorder_same_source"):
            state = model.reorder_same_source(state, src_rows)  # no sentence left: the source side stays put
        else:
            state = model.reorder(state, src_rows)
        logits, state = model.step(feed.astype(np.int32), state)

    return [sorted(hyps, key=lambda h: -h[0])[:n_best] for hyps in finished]  # stable: earlier-finished first


__all__ = ["IncrementalDecoder", "greedy", "sample", "sampling_distribution", "beam_search", "length_penalty",
           "log_softmax64"]
