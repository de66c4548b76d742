"""engine/cross_entropy.py: the blocked softmax cross-entropy equals the plain whole-array formula (float32 and
float64, label smoothing, ignored rows, any block size), and linear_cross_entropy (the output projection fused with
the loss, real rows gathered before the GEMM) equals the full path: same loss, same gradients of h, weight and bias;
float64 gradient checks."""
import numpy as np
import pytest

from ndtrain.engine import cross_entropy as ce
from ndtrain.engine import losses
from ndtrain.engine.gradcheck import check_function


def plain_softmax_xent(x, t, valid, eps):
    """The unblocked reference: loss sum and dlogits of the sum, in float64."""
    x = np.asarray(x, np.float64)
    K = x.shape[1]
    z = x - x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    tt = np.where(valid, t, 0)
    per = lse - (1 - eps) * z[np.arange(len(t)), tt] - eps / K * z.sum(axis=1)
    p = np.exp(z - lse[:, None])
    g = p - eps / K
    g[np.arange(len(t)), tt] -= 1 - eps
    g[~valid] = 0
    return float(per[valid].sum()), g


def case(N=37, K=23, dtype=np.float64, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((N, K))).astype(dtype)
    t = rng.integers(0, K, N)
    if ignore:
        t[rng.random(N) < 0.3] = -100
    return x, t, t != -100


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("block_elems", [1, 23 * 5, 23 * 8 + 7, None])  # 1 row, 5 rows, 8 rows, all rows
def test_blocked_softmax_xent_equals_plain(dtype, eps, block_elems):
    x, t, valid = case(dtype=dtype)
    ref_loss, ref_grad = plain_softmax_xent(x, t, valid, eps)
    e = x.copy()
    s, per = ce.softmax_xent_rows(e, np.where(valid, t, 0), eps, block_elems=block_elems)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert float(per[valid].sum()) == pytest.approx(ref_loss, rel=tol)
    g = ce.softmax_xent_grad_(e, s, t, valid, eps, 0.5, block_elems=block_elems)
    assert g.dtype == dtype
    np.testing.assert_allclose(g, 0.5 * ref_grad, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_fused_is_blocked_and_equals_plain(dtype, monkeypatch):
    x, t, valid = case(N=64, K=50, dtype=dtype, seed=3)
    ref_loss, ref_grad = plain_softmax_xent(x, t, valid, 0.1)
    monkeypatch.setattr(ce, "CE_BLOCK_ELEMS", 50 * 6)  # 6-row blocks, a short last one
    loss, count, grad_fn = losses.cross_entropy_fused(x.copy(), t, label_smoothing=0.1, inplace=True)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert loss == pytest.approx(ref_loss, rel=tol) and count == int(valid.sum())
    np.testing.assert_allclose(grad_fn(2.0), 2.0 * ref_grad, rtol=0, atol=10 * tol)


def test_blocked_softmax_xent_gradcheck():
    x, t, valid = case(N=9, K=7)
    e = x.copy()
    s, _ = ce.softmax_xent_rows(e, np.where(valid, t, 0), 0.2, block_elems=14)
    g = ce.softmax_xent_grad_(e, s, t, valid, 0.2, 1.0, block_elems=14)

    def f(xx):
        return float(ce.softmax_xent_rows(xx.copy(), np.where(valid, t, 0), 0.2, block_elems=14)[1][valid].sum())

    assert check_function(f, [x], [g])["input0"] < 1e-6


def head_case(N=30, D=6, K=11, seed=0, dtype=np.float64, pad_share=0.4):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((K, D)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    t = rng.integers(0, K, N)
    t[rng.random(N) < pad_share] = -1
    return h, W, b, t


def reference_head(h, W, b, t, eps, scale):
    """logits = h W^T + b, then the plain loss; gradients by the chain rule, in float64."""
    logits = h @ W.T + (0 if b is None else b)
    valid = t != -1
    loss, g = plain_softmax_xent(logits, t, valid, eps)
    g *= scale
    return loss, g @ W, g.T @ h, g.sum(axis=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("gather", [True, False])
def test_linear_cross_entropy_equals_the_full_path(bias, eps, gather):
    h, W, b, t = head_case()
    b = b if bias else None
    dW, db = np.zeros_like(W), np.zeros_like(W[:, 0])
    loss, count, backward = ce.linear_cross_entropy(h.reshape(5, 6, -1), W, t.reshape(5, 6), bias=b, dweight=dW,
                                                    dbias=db if bias else None, ignore_index=-1,
                                                    label_smoothing=eps, gather=gather, block_elems=11 * 4)
    dh = backward(0.25)
    ref_loss, ref_dh, ref_dW, ref_db = reference_head(h, W, b, t, eps, 0.25)
    assert count == int((t != -1).sum())
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert dh.shape == (5, 6, 6)
    np.testing.assert_allclose(dh.reshape(30, 6), ref_dh, rtol=1e-10, atol=1e-12)
    assert not dh.reshape(30, 6)[t == -1].any()  # no gradient reaches a padding position
    np.testing.assert_allclose(dW, ref_dW, rtol=1e-10, atol=1e-12)
    if bias:
        np.testing.assert_allclose(db, ref_db, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_accumulates_into_views_and_float32():
    """An untied (D, K) output matrix is passed as its .T view; gradients ACCUMULATE (+=) there."""
    h, W, b, t = head_case(dtype=np.float32, seed=4)
    w_out = np.ascontiguousarray(W.T)  # (D, K)
    grad = np.full_like(w_out, 0.5)
    loss, _, backward = ce.linear_cross_entropy(h, w_out.T, t, dweight=grad.T, ignore_index=-1,
                                                label_smoothing=0.1)
    dh = backward(1.0)
    ref_loss, ref_dh, ref_dW, _ = reference_head(h.astype(np.float64), W.astype(np.float64), None, t, 0.1, 1.0)
    assert dh.dtype == np.float32 and loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, 0.5 + ref_dW.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-5)


def test_gathered_path_computes_only_the_real_rows(monkeypatch):
    """The GEMM and the softmax see the real rows only (the gather happens BEFORE the output projection)."""
    seen = []
    real = ce.softmax_xent_rows
    monkeypatch.setattr(ce, "softmax_xent_rows", lambda e, *a, **k: (seen.append(e.shape), real(e, *a, **k))[1])
    h, W, b, t = head_case(N=40, pad_share=0.5)
    n_real = int((t != -1).sum())
    ce.linear_cross_entropy(h, W, t, ignore_index=-1)
    ce.linear_cross_entropy(h, W, t, ignore_index=-1, gather=False)
    assert seen == [(n_real, 11), (40, 11)] and n_real < 30


@pytest.mark.parametrize("gather", [True, False])
def test_linear_cross_entropy_gradcheck(gather):
    h, W, b, t = head_case(N=8, D=3, K=5, seed=2)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    _, _, backward = ce.linear_cross_entropy(h, W, t, bias=b, dweight=dW, dbias=db, ignore_index=-1,
                                             label_smoothing=0.1, gather=gather, block_elems=10)
    dh = backward(1.0)

    def f(hh, WW, bb):
        return ce.linear_cross_entropy(hh, WW, t, bias=bb, ignore_index=-1, label_smoothing=0.1, gather=gather,
                                       block_elems=10)[0]

    errors = check_function(f, [h, W, b], [dh, dW, db])
    assert max(errors.values()) < 1e-6, errors


def test_linear_cross_entropy_bad_input():
    h, W, b, t = head_case()
    t[3] = 11
    with pytest.raises(ValueError, match="target 11 at flat row 3"):
        ce.linear_cross_entropy(h, W, t, ignore_index=-1)
    with pytest.raises(ValueError, match="needs targets of shape"):
        ce.linear_cross_entropy(h, W, t[:-1], ignore_index=-1)
