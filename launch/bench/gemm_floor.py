"""The GEMM floor of a bench config's training step: every matrix product one ndtrain step performs (forward and
backward; the attention products by the same causal blocks), replayed alone with np.matmul into preallocated outputs.

No NumPy engine calling this BLAS can take less time per step, even if all its elementwise work (GELU, softmax,
LayerNorm, biases, residuals, loss, AdamW) were free. Timed between the engines' steps (`ndtrain bench engine
--floor`), it splits a step into "GEMMs" and "everything else", and says how much of a target ratio against torch
is left for the elementwise work.
"""
from __future__ import annotations

import time

import numpy as np

from ndtrain.engine.attention import _blocks, make_attention_mask


def _linear(m: int, k: int, n: int) -> list[tuple]:
    """y = x W: forward (m,k)@(k,n), weight gradient x^T dy (k,m)@(m,n), input gradient dy W^T (m,n)@(n,k).
    Entries: (a_shape, b_shape, transpose_a, transpose_b) with the shapes as stored."""
    return [((m, k), (k, n), False, False), ((m, k), (m, n), True, False), ((m, n), (k, n), False, True)]


def _attention(BH: int, T: int, Tk: int, dh: int, causal: bool) -> list[tuple]:
    """The six batched products of scaled dot-product attention per query block (see engine.attention)."""
    mask = make_attention_mask(causal=True, tq=T, tk=Tk, q_offset=Tk - T) if causal else None
    out = []
    for q0, q1, k1 in _blocks(mask, T, Tk):
        tq = q1 - q0
        out += [((BH, tq, dh), (BH, k1, dh), False, True),  # scores q k^T
                ((BH, tq, k1), (BH, k1, dh), False, False),  # p v
                ((BH, tq, k1), (BH, tq, dh), True, False),  # dv = p^T dctx
                ((BH, tq, dh), (BH, k1, dh), False, True),  # dp = dctx v^T
                ((BH, tq, k1), (BH, k1, dh), False, False),  # dq = ds k
                ((BH, tq, k1), (BH, tq, dh), True, False)]  # dk = ds^T q
    return out


def gemm_list(c: dict) -> list[tuple]:
    """Every product of one training step of bench config c (kind 'seq2seq' or 'lm')."""
    d, ff, V, B, T, H = c["d"], c["ff"], c["vocab"], c["batch"], c["len"], c["h"]
    N, BH, dh = B * T, B * H, d // H
    n_enc, n_dec = c["layers"]
    ffn = _linear(N, d, ff) + _linear(N, ff, d)
    out = []
    for _ in range(n_enc):
        out += _linear(N, d, 3 * d) + _attention(BH, T, T, dh, False) + _linear(N, d, d) + ffn
    for _ in range(n_dec):
        out += _linear(N, d, 3 * d) + _attention(BH, T, T, dh, True) + _linear(N, d, d)
        if c["kind"] == "seq2seq":  # cross-attention: queries of the target, keys and values of the memory
            out += _linear(N, d, d) + _linear(N, d, 2 * d) + _attention(BH, T, T, dh, False) + _linear(N, d, d)
        out += ffn
    return out + _linear(N, d, V)  # output projection (tied or not, the same products)


def gflop(products: list[tuple]) -> float:
    total = 0
    for a, b, ta, tb in products:
        m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
        n = b[-2] if tb else b[-1]
        total += 2 * m * k * n * (a[0] if len(a) == 3 else 1)
    return total / 1e9


def make_replay(c: dict):
    """Returns step(_batch) -> (seconds, 0, 0) replaying gemm_list(c) once on preallocated float32 arrays."""
    rng = np.random.default_rng(0)
    calls = []
    for a_shape, b_shape, ta, tb in gemm_list(c):
        a = rng.standard_normal(a_shape).astype(np.float32)
        b = rng.standard_normal(b_shape).astype(np.float32)
        a_op = a.swapaxes(-1, -2) if ta else a
        b_op = b.swapaxes(-1, -2) if tb else b
        calls.append((a_op, b_op, np.empty(a_op.shape[:-1] + (b_op.shape[-1],), np.float32)))

    def step(_batch):
        t0 = time.perf_counter()
        for a_op, b_op, out in calls:
            np.matmul(a_op, b_op, out=out)
        return time.perf_counter() - t0, 0.0, 0.0

    return step
