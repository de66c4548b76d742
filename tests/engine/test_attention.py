"""Scaled dot-product attention and MultiHeadAttention: float64 gradient checks (padding + causal masks, a fully
padded row, dropout) and forward semantics."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine.attention import (AttentionMask, MultiHeadAttention, make_attention_mask,
                                      scaled_dot_product_attention)
from ndtrain.engine.gradcheck import assert_gradcheck, check_function
from ndtrain.engine.kernels import MASK_VALUE, softmax

RNG = np.random.default_rng(0)


def _mask_with_empty_row():
    """Batch 1's first key is padding; with the causal mask its query 0 sees no key at all."""
    pad = np.array([[False, False, False, False], [True, False, False, True]])
    return make_attention_mask(pad, causal=True, tq=4, dtype=np.float64)


def _reference(q, k, v, mask):
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if mask.additive is not None:
        s = s + mask.additive
    p = softmax(s)
    if mask.row_valid is not None:
        p = p * mask.row_valid
    return p @ v, p


def test_mask_combines_padding_and_look_ahead():
    m = _mask_with_empty_row()
    blocked = m.additive == MASK_VALUE  # (2, 1, 4, 4)
    assert blocked.shape == (2, 1, 4, 4)
    assert blocked[0, 0].tolist() == np.triu(np.ones((4, 4), bool), 1).tolist()
    assert blocked[1, 0, 2].tolist() == [True, False, False, True]
    assert m.row_valid[:, 0, :, 0].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert make_attention_mask(np.zeros((2, 3), bool)).row_valid is None
    assert make_attention_mask().additive is None


def test_sdpa_matches_reference_and_gives_zeros_not_nan_for_an_empty_row():
    q, k, v = (RNG.standard_normal((2, 3, 4, 5)) for _ in range(3))
    mask = _mask_with_empty_row()
    ctx, p, _ = scaled_dot_product_attention(q, k, v, mask)
    ref_ctx, ref_p = _reference(q, k, v, mask)
    np.testing.assert_allclose(ctx, ref_ctx, rtol=1e-12, atol=1e-12)
    assert np.isfinite(ctx).all() and np.isfinite(p).all()
    assert np.all(ctx[1, :, 0] == 0) and np.all(p[1, :, 0] == 0)  # empty row: exactly zero
    valid = mask.row_valid[..., 0].astype(bool) & np.ones((2, 3, 4), bool)
    np.testing.assert_allclose(p.sum(-1)[valid], 1.0, rtol=1e-12)  # rows sum to 1
    assert np.all(p[mask.additive.repeat(3, axis=1) == MASK_VALUE] == 0)  # padded / future keys get zero weight


def test_sdpa_gradients_with_masks_and_empty_row():
    q, k, v = (RNG.standard_normal((2, 2, 4, 3)) for _ in range(3))
    mask = _mask_with_empty_row()
    c = RNG.standard_normal((2, 2, 4, 3))
    ctx, _, backward = scaled_dot_product_attention(q, k, v, mask)
    dq, dk, dv = backward(c)
    f = lambda q, k, v: float(np.sum(scaled_dot_product_attention(q, k, v, mask)[0] * c))  # noqa: E731
    errors = check_function(f, [q, k, v], [dq, dk, dv], full_max=100)
    assert max(errors.values()) < 1e-6, errors
    assert np.all(dq[1, :, 0] == 0)  # the empty row passes no gradient


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_self_attention_gradcheck(dropout):
    mha = MultiHeadAttention(8, 2, dropout=dropout)
    ParamStore.from_module(mha, dtype=np.float64, seed=1)
    for p in (mha.b_qkv, mha.b_o):
        p.data[...] = RNG.standard_normal(p.shape)  # non-zero biases: their gradients are exercised
    x = RNG.standard_normal((2, 4, 8))
    mask = make_attention_mask(np.array([[False] * 4, [True, False, False, True]]), causal=True, tq=4,
                               dtype=np.float64)
    reseed = lambda: setattr(mha, "rng", np.random.default_rng(5))  # noqa: E731  same dropout mask each time
    assert_gradcheck(mha, [x], forward_kwargs={"mask": mask}, before_forward=reseed)


def test_cross_attention_gradcheck_returns_dx_and_dmemory():
    mha = MultiHeadAttention(8, 2, cross=True)
    ParamStore.from_module(mha, dtype=np.float64, seed=2)
    mha.b_kv.data[...] = RNG.standard_normal(mha.b_kv.shape)
    x, mem = RNG.standard_normal((2, 3, 8)), RNG.standard_normal((2, 5, 8))
    mask = make_attention_mask(np.array([[False] * 5, [False, False, True, True, True]]), dtype=np.float64)
    errors = assert_gradcheck(mha, [x, mem], forward_kwargs={"mask": mask})
    assert "input0" in errors and "input1" in errors


def test_causal_output_at_t_ignores_later_tokens_and_record_keeps_weights():
    mha = MultiHeadAttention(8, 2)
    ParamStore.from_module(mha, dtype=np.float64, seed=3)
    x = RNG.standard_normal((1, 6, 8))
    mask = make_attention_mask(causal=True, tq=6, tk=6, dtype=np.float64)
    rec = {}
    y, _ = mha(x, mask=mask, record=rec, train=False)
    x2 = x.copy()
    x2[:, 4:] = RNG.standard_normal((1, 2, 8))
    y2, _ = mha(x2, mask=mask, train=False)
    np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y2[:, 4:], y[:, 4:])
    w = rec[mha.path]
    assert w.shape == (1, 2, 6, 6) and np.allclose(w.sum(-1), 1.0) and np.all(np.triu(w[0, 0], 1) == 0)
    assert mha(x, mask=mask, train=False)[0] is not None and len(rec) == 1  # nothing kept unless asked


def test_padded_keys_do_not_change_the_output():
    mha = MultiHeadAttention(8, 2, cross=True)
    ParamStore.from_module(mha, dtype=np.float64, seed=4)
    x, mem = RNG.standard_normal((1, 3, 8)), RNG.standard_normal((1, 5, 8))
    mask = make_attention_mask(np.array([[False, False, False, True, True]]), dtype=np.float64)
    y, _ = mha(x, mem, mask=mask, train=False)
    mem2 = mem.copy()
    mem2[:, 3:] = 100 * RNG.standard_normal((1, 2, 8))
    np.testing.assert_allclose(mha(x, mem2, mask=mask, train=False)[0], y, rtol=1e-12)
    y_short, _ = mha(x, mem[:, :3], train=False)
    np.testing.assert_allclose(y_short, y, rtol=1e-12)


def test_kv_cache_step_equals_full_attention():
    mha = MultiHeadAttention(8, 2)
    ParamStore.from_module(mha, dtype=np.float64, seed=6)
    x = RNG.standard_normal((2, 5, 8))
    full, _ = mha(x, mask=make_attention_mask(causal=True, tq=5, tk=5, dtype=np.float64), train=False)
    cache, outs = {}, []
    for t in range(5):
        y, cache = mha.step(x[:, t:t + 1], cache, make_attention_mask(causal=True, tq=1, tk=t + 1, q_offset=t,
                                                                       dtype=np.float64))
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-10, atol=1e-12)
    assert cache["k"].shape == (2, 2, 5, 4)


def test_attention_mask_select_and_bad_heads():
    m = _mask_with_empty_row()
    s = m.select(np.array([1, 1, 0]))
    assert s.additive.shape[0] == 3 and s.row_valid[0, 0, 0, 0] == 0
    assert isinstance(AttentionMask().select(np.array([0])), AttentionMask)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(10, 3)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("q_offset", [0, 5])
def test_causal_block_skipping_is_exact_and_differentiable(q_offset, padded):
    """T >= CAUSAL_MIN_T splits queries into blocks that skip masked keys; results equal the reference, weights
    above the diagonal are exactly 0, and gradients pass the float64 check. With key padding the whole mask is
    added; a look-ahead mask alone (padded False) is added only from each block's first query on."""
    from ndtrain.engine import attention
    Tq = attention.CAUSAL_MIN_T + 6  # a partial last block
    Tk = Tq + q_offset
    pad = None
    if padded:
        pad = np.zeros((2, Tk), bool)
        pad[1, :q_offset + 1] = True  # batch 1: its first query sees no key at all
        pad[0, -3:] = True
    mask = make_attention_mask(pad, causal=True, tq=Tq, tk=Tk, q_offset=q_offset, dtype=np.float64)
    assert mask.padded == padded
    assert len(attention._blocks(mask, Tq, Tk)) == 3
    q = RNG.standard_normal((2, 2, Tq, 3))
    k, v = RNG.standard_normal((2, 2, Tk, 3)), RNG.standard_normal((2, 2, Tk, 3))
    ctx, p, backward = scaled_dot_product_attention(q, k, v, mask)
    ref_ctx, ref_p = _reference(q, k, v, mask)
    np.testing.assert_allclose(ctx, ref_ctx, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(p, ref_p, rtol=1e-11, atol=1e-12)
    assert np.all(p[..., np.arange(Tk)[None, :] > q_offset + np.arange(Tq)[:, None]] == 0.0)
    c = RNG.standard_normal(ctx.shape)
    grads = backward(c)
    f = lambda q, k, v: float(np.sum(scaled_dot_product_attention(q, k, v, mask)[0] * c))  # noqa: E731
    errors = check_function(f, [q, k, v], grads, n_dirs=6)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("level", [60.0, 70.0, -200.0])
def test_sdpa_scores_around_the_shift_free_limit(dtype, level):
    """Scores up to SHIFT_FREE_MAX take exp unshifted, larger ones the per-matrix shift, and a row whose scores all
    sit far below 0 (exp underflows to a zero sum without a shift) the per-row fallback: all equal the reference."""
    from ndtrain.engine.attention import SHIFT_FREE_MAX
    q = RNG.standard_normal((2, 2, 3, 4)).astype(dtype)
    k = RNG.standard_normal((2, 2, 5, 4)).astype(dtype)
    v = RNG.standard_normal((2, 2, 5, 4)).astype(dtype)
    k[..., 0] = 1.0
    q[..., 0] = 0.0
    q[0, 1, 2, 0] = 2.0 * level  # one row of one matrix: scores near `level` (the scale is 1/2)
    mask = make_attention_mask(causal=False, tq=3, tk=5)
    ctx, p, _ = scaled_dot_product_attention(q, k, v, mask)
    ref_ctx, ref_p = _reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask)
    assert np.isfinite(p).all() and np.isfinite(ctx).all()
    assert (level > SHIFT_FREE_MAX) == (level == 70.0)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(p, ref_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(ctx, ref_ctx, rtol=tol, atol=tol)
