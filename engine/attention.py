"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017), forward beside backward.

Layout: heads are strided (B, H, T, dh) *views* of the fused projection output (B, T, 3, H, dh) - no copies -, and
every product is a batched `np.matmul` (BLAS per matrix; `np.einsum` is ~10x slower here). The attention output is
written straight into a (B, T, H, dh) buffer, so the output projection is one 2-D GEMM.

Masks are additive: 0 where a query may look, MASK_VALUE (large, finite) where it may not - never -inf. A query row
with no key at all (a fully padded source, say) gets attention weights of exactly zero, hence an output of zero and
no gradient, instead of NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import init as initializers
from .kernels import MASK_VALUE, add_row_, col_sum, dropout_mask, row_sum
from .module import Module
from .params import Param


# -- masks ------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionMask:
    """additive: (B|1, 1, Tq|1, Tk), 0 or MASK_VALUE; row_valid: (B|1, 1, Tq|1, 1) 1/0, None when every row sees a
    key; causal_offset: q_offset of a look-ahead mask (lets attention skip key blocks every query masks), else None;
    padded: whether key padding is part of the mask (a look-ahead mask alone masks no key before a query block)."""

    additive: np.ndarray | None = None
    row_valid: np.ndarray | None = None
    causal_offset: int | None = None
    padded: bool = True

    def select(self, idx: np.ndarray) -> "AttentionMask":
        """Rows of the batch (beam search reorders its hypotheses); broadcast (1, ...) masks are kept."""
        pick = lambda a: a if a is None or a.shape[0] == 1 else a[idx]  # noqa: E731
        return AttentionMask(pick(self.additive), pick(self.row_valid), self.causal_offset, self.padded)


def make_attention_mask(key_padding_mask: np.ndarray | None = None, causal: bool = False, tq: int | None = None,
                        tk: int | None = None, q_offset: int = 0, dtype=np.float32) -> AttentionMask:
    """key_padding_mask: (B, Tk) bool, True where the key is padding (ignored). causal: the look-ahead mask, query i
    (absolute position q_offset + i) sees keys j <= q_offset + i. Both are combined into one mask of shape
    (B|1, 1, Tq, Tk), or (B, 1, 1, Tk) for padding alone (the same for every query)."""
    if key_padding_mask is None and not causal:
        return AttentionMask()
    if key_padding_mask is not None:
        tk = key_padding_mask.shape[1]
    if not causal:
        tq = 1  # a padding-only mask is the same for every query: broadcast over Tq
    elif tq is None:
        tq = tk - q_offset
    blocked = np.zeros((1, 1, tq, tk), dtype=bool)
    if causal:
        look_ahead_mask = np.arange(tk)[None, :] > (q_offset + np.arange(tq))[:, None]  # (Tq, Tk)
        blocked = blocked | look_ahead_mask
    if key_padding_mask is not None:
        blocked = blocked | np.asarray(key_padding_mask, dtype=bool)[:, None, None, :]
    additive = np.where(blocked, np.asarray(MASK_VALUE, dtype), np.asarray(0, dtype)).astype(dtype)
    empty = blocked.all(axis=-1, keepdims=True)  # (B|1, 1, Tq, 1)
    row_valid = (~empty).astype(dtype) if empty.any() else None
    return AttentionMask(additive, row_valid, q_offset if causal else None, key_padding_mask is not None)


# -- scaled dot-product attention -------------------------------------------------------------------------------------
CAUSAL_BLOCK = 32  # query rows per block when skipping masked key blocks
CAUSAL_MIN_T = 64  # below this many queries one block is faster (fewer, larger matmuls)


def _blocks(mask: AttentionMask | None, Tq: int, Tk: int) -> list[tuple[int, int, int]]:
    """(q0, q1, k1): query rows q0:q1 attend to keys :k1 only. With a look-ahead mask the keys after the block's last
    query are masked for every row of the block, so skipping them is exact (their weight is exactly 0) and saves
    about half the attention FLOPs at long T (Tq = Tk = 128: 62.5% of the full products)."""
    if mask is None or mask.causal_offset is None or Tq < CAUSAL_MIN_T:
        return [(0, Tq, Tk)]
    off = mask.causal_offset
    return [(q0, min(q0 + CAUSAL_BLOCK, Tq), min(Tk, off + min(q0 + CAUSAL_BLOCK, Tq)))
            for q0 in range(0, Tq, CAUSAL_BLOCK)]


def _rows(a: np.ndarray, q0: int, q1: int, k1: int | None = None):
    """Slice a mask array (B|1, 1, Tq|1, Tk|1) to query rows q0:q1 (if it has them) and keys :k1."""
    if a is None:
        return None
    if a.shape[2] != 1:
        a = a[:, :, q0:q1]
    return a if k1 is None else a[..., :k1]


# Scores at most this large need no stabilizing shift: exp(64) = 6e27, and a row sum of a million of them is still
# far below float32's max (3e38).
SHIFT_FREE_MAX = 64.0


def _add_mask(p, mask: AttentionMask, q0: int, q1: int, k1: int) -> None:
    """p (B, H, tq, k1) += the additive mask of query rows q0:q1. A look-ahead mask alone masks no key before the
    block's first query (q_offset + q0): only the keys from there on get the add."""
    c0 = 0
    if mask.causal_offset is not None and not mask.padded:
        c0 = min(k1, max(0, mask.causal_offset + q0))
    p[..., c0:] += _rows(mask.additive, q0, q1, k1)[..., c0:]


def _exp_scores(qs, k, mask: AttentionMask | None, q0: int, q1: int, k1: int, row_valid):
    """exp(scores - c) (B, H, tq, k1) and its row sums (B, H, tq, 1), for a stabilizing shift c; rows with no key
    (row_valid 0) get a sum of inf.

    c = 0 when no score exceeds SHIFT_FREE_MAX (nothing can overflow: one max, no subtraction pass), else the max of
    each (b, h) score matrix, not of each row: a reduction over T*T contiguous values is ~10x cheaper than NumPy's
    reduction over short rows (T = 32: 0.04 vs 0.4 ms at B*H = 256), and softmax is shift-invariant. Should a row
    with a key sit so far below c that its exps near the bottom of the float range (row sum < sqrt(tiny)), the block
    is redone with the per-row max, the textbook form."""
    p = np.matmul(qs, k.swapaxes(-1, -2))  # (B, H, tq, k1)
    if mask is not None and mask.additive is not None:
        _add_mask(p, mask, q0, q1, k1)
    if p.size == 0:
        return p, row_sum(p)
    B, H = p.shape[:2]
    top = p.reshape(B, H, -1).max(axis=-1)  # (B, H)
    if not top.max() <= SHIFT_FREE_MAX:  # (NaN scores also take the shift)
        p -= top.reshape(B, H, 1, 1)
    np.exp(p, out=p)
    denom = row_sum(p)
    if row_valid is not None:  # rows with no key at all get weights 0: a sum of inf makes 1 / sum = 0
        denom = np.where(row_valid > 0, denom, np.asarray(np.inf, p.dtype))
    if denom.min() < np.sqrt(np.finfo(p.dtype).tiny):
        np.matmul(qs, k.swapaxes(-1, -2), out=p)
        if mask is not None and mask.additive is not None:
            _add_mask(p, mask, q0, q1, k1)
        p -= p.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        denom = row_sum(p)
        if row_valid is not None:
            denom = np.where(row_valid > 0, denom, np.asarray(np.inf, p.dtype))
    return p, denom


def scaled_dot_product_attention(q, k, v, mask: AttentionMask | None = None, dropout_p: float = 0.0,
                                 rng: np.random.Generator | None = None, out: np.ndarray | None = None,
                                 need_weights: bool = True, need_backward: bool = True):
    """softmax(q k^T / sqrt(dh) + mask) v.

    q: (B, H, Tq, dh), k, v: (B, H, Tk, dh) (strided views are fine); out: optional (B, H, Tq, dh) destination.
    Returns (ctx (B, H, Tq, dh), weights (B, H, Tq, Tk) before dropout or None if not need_weights, backward) where
    backward(dctx, dq=None, dk=None, dv=None) -> (dq, dk, dv), writing into the given destinations if any.
    need_backward=False (inference): backward is None and no block's weights outlive its product with v (unless
    need_weights asks for them).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = np.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    qs = q * scale  # (B, H, Tq, dh) contiguous; cheaper than scaling the (Tq, Tk) scores
    if out is None:
        out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    blocks = _blocks(mask, Tq, Tk)
    saved = []
    for q0, q1, k1 in blocks:
        row_valid = None if mask is None else _rows(mask.row_valid, q0, q1)
        p, denom = _exp_scores(qs[..., q0:q1, :], k[..., :k1, :], mask, q0, q1, k1, row_valid)
        np.reciprocal(denom, out=denom)  # rows with no key: 1 / inf = 0
        p *= denom
        keep = dropout_mask(rng, p.shape, dropout_p, p.dtype) if dropout_p > 0.0 else None
        pd = p * keep if keep is not None else p
        np.matmul(pd, v[..., :k1, :], out=out[..., q0:q1, :])
        if need_backward or need_weights:
            saved.append((q0, q1, k1, p, None if not need_backward else pd, keep))
    if not need_backward:
        weights = None
        if need_weights:
            weights = np.zeros(q.shape[:-1] + (Tk,), dtype=q.dtype)
            for q0, q1, k1, p, _, _ in saved:
                weights[..., q0:q1, :k1] = p
        return out, weights, None
    if len(blocks) == 1:
        weights = saved[0][3]
    elif need_weights:
        weights = np.zeros(q.shape[:-1] + (Tk,), dtype=q.dtype)
        for q0, q1, k1, p, _, _ in saved:
            weights[..., q0:q1, :k1] = p
    else:
        weights = None

    def backward(dctx, dq=None, dk=None, dv=None):
        shape_k = k.shape[:-1] + (q.shape[-1],)
        dq = np.empty(q.shape, q.dtype) if dq is None else dq
        dk = np.empty(shape_k, q.dtype) if dk is None else dk
        dv = np.empty(v.shape, q.dtype) if dv is None else dv
        single = len(saved) == 1
        if not single:
            dk[...] = 0
            dv[...] = 0
        for q0, q1, k1, p, pd, keep in saved:
            dctx_b = dctx[..., q0:q1, :]
            if single:
                np.matmul(pd.swapaxes(-1, -2), dctx_b, out=dv)
            else:
                dv[..., :k1, :] += np.matmul(pd.swapaxes(-1, -2), dctx_b)  # (B, H, k1, dh)
            dp = np.matmul(dctx_b, v[..., :k1, :].swapaxes(-1, -2))  # (B, H, tq, k1)
            if keep is not None:
                dp *= keep
            # softmax backward in place: ds = p * (dp - sum(dp * p)); rows with no key have p = 0 -> ds = 0
            row = row_sum(np.multiply(dp, p))
            dp -= row
            dp *= p
            np.matmul(dp, k[..., :k1, :], out=dq[..., q0:q1, :])
            if single:
                np.matmul(dp.swapaxes(-1, -2), qs, out=dk)
            else:
                dk[..., :k1, :] += np.matmul(dp.swapaxes(-1, -2), qs[..., q0:q1, :])
        dq *= scale
        return dq, dk, dv

    return out, weights, backward


# -- multi-head attention ---------------------------------------------------------------------------------------------
class MultiHeadAttention(Module):
    """Self-attention (one fused QKV projection) or cross-attention (Q from x, one fused KV projection of memory).

    forward(x (B, Tq, D), memory (B, Tk, D) for cross only, mask=AttentionMask, record=dict|None) -> y (B, Tq, D).
    backward(dy) -> dx for self-attention, (dx, dmemory) for cross-attention.
    record: when a dict is passed, record[self.path] = attention weights (B, H, Tq, Tk), kept only then.
    Weights are stored (in, out) like Linear; names follow the GUIDE: w_qkv, b_qkv / w_q, b_q, w_kv, b_kv, w_o, b_o.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False, bias: bool = True,
                 out_init=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MultiHeadAttention: d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.dropout, self.cross = float(dropout), cross
        D = d_model
        w_init = initializers.xavier_uniform(fan_in=D, fan_out=D)
        zeros = initializers.zeros()
        if cross:
            self.w_q = Param((D, D), w_init)
            self.b_q = Param((D,), zeros, decay=False) if bias else None
            self.w_kv = Param((D, 2 * D), w_init)
            self.b_kv = Param((2 * D,), zeros, decay=False) if bias else None
        else:
            self.w_qkv = Param((D, 3 * D), w_init)
            self.b_qkv = Param((3 * D,), zeros, decay=False) if bias else None
        self.w_o = Param((D, D), out_init or w_init)
        self.b_o = Param((D,), zeros, decay=False) if bias else None
        self.rng = np.random.default_rng(0)

    # -- projections --------------------------------------------------------------------------------------------------
    @staticmethod
    def _project(x2, W, b):
        y = x2 @ W.data
        if b is not None:
            add_row_(y, b.data)
        return y

    @staticmethod
    def _project_backward(dy2, x2, W, b):
        W.grad += x2.T @ dy2
        if b is not None:
            b.grad += col_sum(dy2)
        return dy2 @ W.data.T

    def _heads(self, a, B, T, n):
        """(B*T, n*D) -> n views (B, H, T, dh)."""
        a5 = a.reshape(B, T, n, self.n_heads, self.d_head)
        return [a5[:, :, i].transpose(0, 2, 1, 3) for i in range(n)]

    def project_kv(self, memory):
        """Cross-attention keys and values of memory (B, Tk, D): two (B, H, Tk, dh) views (computed once when
        decoding)."""
        B, Tk, D = memory.shape
        return self._heads(self._project(memory.reshape(B * Tk, D), self.w_kv, self.b_kv), B, Tk, 2)

    # -- training forward ---------------------------------------------------------------------------------------------
    def forward(self, x, memory=None, *, mask: AttentionMask | None = None, record: dict | None = None, train: bool):
        """train=False: forward only, returns (y, None)."""
        B, Tq, D = x.shape
        H, dh = self.n_heads, self.d_head
        x2 = x.reshape(B * Tq, D)
        if self.cross:
            if memory is None:
                raise ValueError(f"{self.path or 'MultiHeadAttention'}: cross-attention needs memory")
            Tk = memory.shape[1]
            m2 = memory.reshape(B * Tk, D)
            q2 = self._project(x2, self.w_q, self.b_q)  # (B*Tq, D)
            kv = self._project(m2, self.w_kv, self.b_kv)  # (B*Tk, 2D)
            (q,), (k, v) = self._heads(q2, B, Tq, 1), self._heads(kv, B, Tk, 2)
        else:
            qkv = self._project(x2, self.w_qkv, self.b_qkv)  # (B*T, 3D)
            q, k, v = self._heads(qkv, B, Tq, 3)
        ctx_bthd = np.empty((B, Tq, H, dh), dtype=x.dtype)
        drop = self.dropout if train else 0.0
        _, weights, attn_backward = scaled_dot_product_attention(q, k, v, mask, drop, self.rng,
                                                                 out=ctx_bthd.transpose(0, 2, 1, 3),
                                                                 need_weights=record is not None,
                                                                 need_backward=train)
        if record is not None:
            record[self.path] = weights
        ctx2 = ctx_bthd.reshape(B * Tq, D)
        y = self._project(ctx2, self.w_o, self.b_o).reshape(B, Tq, D)
        if not train:
            return y, None  # inference: nothing is kept for a backward

        def backward(dy):
            dctx2 = self._project_backward(dy.reshape(B * Tq, D), ctx2, self.w_o, self.b_o)  # (B*Tq, D)
            dctx = dctx2.reshape(B, Tq, H, dh).transpose(0, 2, 1, 3)
            if self.cross:
                dq2 = np.empty((B, Tq, H, dh), dtype=dy.dtype)
                dkv = np.empty((B, Tk, 2, H, dh), dtype=dy.dtype)
                attn_backward(dctx, dq2.transpose(0, 2, 1, 3), dkv[:, :, 0].transpose(0, 2, 1, 3),
                              dkv[:, :, 1].transpose(0, 2, 1, 3))
                dx = self._project_backward(dq2.reshape(B * Tq, D), x2, self.w_q, self.b_q)
                dm = self._project_backward(dkv.reshape(B * Tk, 2 * D), m2, self.w_kv, self.b_kv)
                return dx.reshape(B, Tq, D), dm.reshape(B, Tk, D)
            dqkv = np.empty((B, Tq, 3, H, dh), dtype=dy.dtype)
            attn_backward(dctx, *(dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)))
            dx = self._project_backward(dqkv.reshape(B * Tq, 3 * D), x2, self.w_qkv, self.b_qkv)
            return dx.reshape(B, Tq, D)

        return y, backward

    # -- incremental decoding (inference only) ------------------------------------------------------------------------
    def step(self, x, cache, mask: AttentionMask | None = None) -> tuple[np.ndarray, dict]:
        """x: (B, t, D) new positions. Self-attention: cache is a KVCache of the past positions (an empty dict at
        first; a dict of "k", "v" (B, H, t_past, dh) arrays is taken too), extended with the new keys/values;
        cross-attention: cache holds project_kv(memory) for B / g source rows, g >= 1: the g consecutive rows of x
        that decode one source (beam search's hypotheses) attend to its keys together, one matmul per source and
        head. Returns (y, new cache): the old cache still reads the same (beam search may hold it)."""
        B, t, D = x.shape
        H, dh = self.n_heads, self.d_head
        if self.cross:
            k, v, new_cache = cache["k"], cache["v"], cache
            Bc = k.shape[0]
            if B % Bc:
                raise ValueError(f"{self.path or 'MultiHeadAttention'}: {B} query rows for {Bc} source rows")
            (q,) = self._heads(self._project(x.reshape(B * t, D), self.w_q, self.b_q), Bc, B // Bc * t, 1)
        else:
            q, k, v = self._heads(self._project(x.reshape(B * t, D), self.w_qkv, self.b_qkv), B, t, 3)
            if isinstance(cache, KVCache):
                new_cache = cache.append(k, v)
            elif cache.get("k") is not None:
                new_cache = KVCache.of(cache["k"], cache["v"]).append(k, v)
            else:
                new_cache = KVCache.of(k, v)
            k, v = new_cache["k"], new_cache["v"]
        ctx_bthd = np.empty((B, t, H, dh), dtype=x.dtype)
        Bq = q.shape[0]
        scaled_dot_product_attention(q, k, v, mask, out=ctx_bthd.reshape(Bq, -1, H, dh).transpose(0, 2, 1, 3),
                                     need_weights=False, need_backward=False)
        y = self._project(ctx_bthd.reshape(B * t, D), self.w_o, self.b_o).reshape(B, t, D)
        return y, new_cache


class KVCache:
    """Self-attention keys and values of the positions decoded so far: cache["k"], cache["v"] (B, H, n, dh), views
    of buffers with room for more positions. A step writes its new keys and values into that room (append) instead
    of copying the whole cache into a new array each step (np.concatenate); select (beam search's reorder) gathers
    rows with their room. Appending to an older view of the buffers (a state decoded from twice) copies instead, so
    every KVCache keeps reading what it read when it was made."""

    ROOM = 8  # positions of room added when the buffers are (re)allocated

    __slots__ = ("kbuf", "vbuf", "n", "_tip")

    def __init__(self, kbuf: np.ndarray, vbuf: np.ndarray, n: int, tip: list):
        self.kbuf, self.vbuf, self.n = kbuf, vbuf, n
        self._tip = tip  # [positions written into these buffers so far], shared by every view of them

    @classmethod
    def of(cls, k: np.ndarray, v: np.ndarray) -> "KVCache":
        """A cache holding k, v (B, H, n, dh) (copied, with room)."""
        return cls._empty(k, k.shape[2] + cls.ROOM).append(k, v)

    @classmethod
    def _empty(cls, like: np.ndarray, capacity: int) -> "KVCache":
        B, H, _, dh = like.shape
        return cls(np.empty((B, H, capacity, dh), like.dtype), np.empty((B, H, capacity, dh), like.dtype), 0, [0])

    def __getitem__(self, name: str) -> np.ndarray:
        buf = {"k": self.kbuf, "v": self.vbuf}[name]
        return buf[:, :, :self.n]

    def append(self, k: np.ndarray, v: np.ndarray) -> "KVCache":
        """The cache extended by k, v (B, H, t, dh)."""
        n, t = self.n, k.shape[2]
        if self._tip[0] == n and n + t <= self.kbuf.shape[2]:
            out = KVCache(self.kbuf, self.vbuf, n, self._tip)  # the newest view: write into the room
        else:
            out = KVCache._empty(k, n + t + self.ROOM)
            out.kbuf[:, :, :n] = self.kbuf[:, :, :n]
            out.vbuf[:, :, :n] = self.vbuf[:, :, :n]
            out.n = out._tip[0] = n
        out.kbuf[:, :, n:n + t] = k
        out.vbuf[:, :, n:n + t] = v
        out.n = out._tip[0] = n + t
        return out

    def select(self, idx: np.ndarray) -> "KVCache":
        """Rows idx of the cache (one gather of each buffer, its room included)."""
        return KVCache(self.kbuf[idx], self.vbuf[idx], self.n, [self.n])
