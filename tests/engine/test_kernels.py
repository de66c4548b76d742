"""engine.kernels tested alone: values against direct formulas, gradients by central differences, numerics."""
import math
import warnings

import numpy as np
import pytest

from ndtrain.engine import kernels as K
from ndtrain.engine.gradcheck import check_function

RNG = np.random.default_rng(42)


def grad_err(f, x, dx):
    """Worst relative error of the analytic dx for the scalar sum(f(x) * c)."""
    c = RNG.standard_normal(np.shape(f(x)))
    return max(check_function(lambda x_: float(np.sum(f(x_) * c)), [x], [dx(c)]).values())


def test_softmax_and_backward():
    x = RNG.standard_normal((3, 7)) * 5
    p = K.softmax(x)
    np.testing.assert_allclose(p, np.exp(x) / np.exp(x).sum(-1, keepdims=True), rtol=1e-12)
    assert grad_err(K.softmax, x, lambda c: K.softmax_backward(p, c)) < 1e-7
    p0 = K.softmax(x, axis=0)
    assert grad_err(lambda z: K.softmax(z, axis=0), x, lambda c: K.softmax_backward(p0, c, axis=0)) < 1e-7


def test_softmax_large_and_masked_inputs():
    x = np.array([[1000.0, 1001.0, MASK := K.MASK_VALUE], [MASK, MASK, MASK]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = K.softmax(x)
        lp = K.log_softmax(x)
    assert np.isfinite(p).all() and np.isfinite(lp).all()
    np.testing.assert_allclose(p[0], [1 / (1 + math.e), math.e / (1 + math.e), 0], rtol=1e-6)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=1e-6)


def test_log_softmax_matches_log_of_softmax():
    x = RNG.standard_normal((4, 9))
    np.testing.assert_allclose(K.log_softmax(x), np.log(K.softmax(x)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6)])
def test_layer_norm_kernel_gradients(shape):
    """Values against the textbook formula and gradients by central differences."""
    x = RNG.standard_normal(shape) * 2 + 1
    gamma, beta = RNG.uniform(0.5, 1.5, 6), RNG.standard_normal(6)
    y, (xhat, rstd) = K.layer_norm(x, gamma, beta)
    np.testing.assert_allclose(y, (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
                               * gamma + beta, rtol=1e-12)
    c = RNG.standard_normal(y.shape)
    dx, dgamma, dbeta = K.layer_norm_backward(c, xhat, rstd, gamma)
    assert dx.shape == x.shape and xhat.shape == x.shape and rstd.shape == x.shape[:-1] + (1,)
    loss = lambda x_, g_, b_: float(np.sum(K.layer_norm(x_, g_, b_)[0] * c))
    assert max(check_function(loss, [x, gamma, beta], [dx, dgamma, dbeta]).values()) < 1e-7


def test_rms_norm_kernel_gradients():
    x = RNG.standard_normal((4, 6)) + 0.5
    gamma = RNG.uniform(0.5, 1.5, 6)
    y, (xhat, rstd) = K.rms_norm(x, gamma)
    np.testing.assert_allclose(y, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * gamma, rtol=1e-12)
    c = RNG.standard_normal(y.shape)
    dx, dgamma = K.rms_norm_backward(c, xhat, rstd, gamma)
    loss = lambda x_, g_: float(np.sum(K.rms_norm(x_, g_)[0] * c))
    assert max(check_function(loss, [x, gamma], [dx, dgamma]).values()) < 1e-7


@pytest.mark.parametrize("name", ["gelu_tanh", "gelu_erf", "silu"])
def test_activation_kernels_with_cache(name):
    fwd, bwd = getattr(K, name), getattr(K, name + "_backward")
    x = RNG.standard_normal((5, 8)) * 3
    y, cache = fwd(x)
    assert grad_err(lambda z: fwd(z)[0], x, lambda c: bwd(c, x, cache)) < 1e-7


def test_gelu_values():
    x = np.linspace(-4, 4, 17)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])  # Phi(x), accurate in the left tail
    np.testing.assert_allclose(K.gelu_erf(x)[0], x * cdf, rtol=1e-12, atol=1e-15)
    assert np.abs(K.gelu_tanh(x)[0] - K.gelu_erf(x)[0]).max() < 1e-3


def test_sigmoid_tanh_relu_kernels():
    x = RNG.standard_normal((5, 8)) * 3
    s = K.sigmoid(x)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-x)), rtol=1e-12)
    assert grad_err(K.sigmoid, x, lambda c: K.sigmoid_backward(c, s)) < 1e-7
    t = np.tanh(x)
    assert grad_err(np.tanh, x, lambda c: K.tanh_backward(c, t)) < 1e-7
    xr = np.where(x > 0, x + 0.1, x - 0.1)  # away from the kink
    r = K.relu(xr)
    assert grad_err(K.relu, xr, lambda c: K.relu_backward(c, r)) < 1e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_saturates_without_warnings(dtype):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = K.sigmoid(x)
        y, _ = K.silu(x)
    assert s.dtype == dtype
    np.testing.assert_array_equal(s[[0, 2, 4]], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(y[[0, 4]], [0.0, 1000.0])


@pytest.mark.parametrize("V,N", [(7, 100), (1000, 50)])
def test_embedding_backward_matches_add_at(V, N):
    ids = RNG.integers(0, V, (N // 10, 10))
    dy = RNG.standard_normal((N // 10, 10, 3)).astype(np.float32)
    got = np.ones((V, 3), np.float32)  # accumulates into what is there
    expected = got.copy()
    K.embedding_backward(got, ids, dy)
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    K.embedding_backward(got, ids[:0], dy[:0])  # no ids: no change, no error
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_extremes_without_warnings():
    x = np.array([-1000.0, -20.0, 0.0, 20.0, 1000.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, s = K.gelu_tanh(x)
        dx = K.gelu_tanh_backward(np.ones_like(x), x, s)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(y, [0, 0, 0, 20, 1000])
    np.testing.assert_array_equal(s[[0, 2, 4]], [0, 0.5, 1])  # s = sigmoid(2u) = 0.5 (1 + tanh u)
    np.testing.assert_array_equal(dx[[0, 2, 4]], [0, 0.5, 1])


def test_float32_kernels_match_float64_reference():
    """The float32 paths (gemv row sums, exp-based GELU) stay within float32 rounding of a float64 evaluation."""
    x64 = RNG.standard_normal((3, 50, 256)) * 4 + 1
    dy64 = RNG.standard_normal(x64.shape)
    g64 = RNG.uniform(0.5, 1.5, 256)
    x, dy, g = x64.astype(np.float32), dy64.astype(np.float32), g64.astype(np.float32)
    pairs = [
        (K.softmax(x), K.softmax(x64)),
        (K.softmax_backward(K.softmax(x), dy), K.softmax_backward(K.softmax(x64), dy64)),
        (K.gelu_tanh(x)[0], K.gelu_tanh(x64)[0]),
        (K.gelu_tanh_backward(dy, x, K.gelu_tanh(x)[1]), K.gelu_tanh_backward(dy64, x64, K.gelu_tanh(x64)[1])),
    ]
    y, (xh, r) = K.layer_norm(x, g, g)
    y64, (xh64, r64) = K.layer_norm(x64, g64, g64)
    pairs += [(y, y64)] + list(zip(K.layer_norm_backward(dy, xh, r, g), K.layer_norm_backward(dy64, xh64, r64, g64)))
    y, (xh, r) = K.rms_norm(x, g)
    y64, (xh64, r64) = K.rms_norm(x64, g64)
    pairs += [(y, y64)] + list(zip(K.rms_norm_backward(dy, xh, r, g), K.rms_norm_backward(dy64, xh64, r64, g64)))
    for i, (a, b) in enumerate(pairs):
        assert a.dtype == np.float32, i
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-5 * scale, (i, np.abs(a - b).max(), scale)


def test_sigmoid_relative_precision_in_the_left_tail():
    x = np.array([-30.0, -20.0, -5.0])
    np.testing.assert_allclose(K.sigmoid(x), np.exp(x) / (1 + np.exp(x)), rtol=1e-14)


def test_embedding_backward_skips_padding_idx_and_works_without_scipy(monkeypatch):
    ids = np.array([[0, 2, 2, 4], [0, 4, 1, 0]])
    dy = RNG.standard_normal((2, 4, 3))
    expected = np.zeros((5, 3))
    keep = ids.reshape(-1) != 0
    np.add.at(expected, ids.reshape(-1)[keep], dy.reshape(-1, 3)[keep])
    got = np.zeros((5, 3))
    K.embedding_backward(got, ids, dy, padding_idx=0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    import sys
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import fails -> np.add.reduceat path
    got2 = np.zeros((5, 3))
    K.embedding_backward(got2, ids, dy, padding_idx=0)
    np.testing.assert_allclose(got2, expected, rtol=1e-12)


def test_elementwise_kernels_take_scalars_and_ints():
    for v in (0.3, np.float32(-2.0), np.array(1.5), 2):
        s = K.sigmoid(v)
        assert np.isclose(s, 1 / (1 + math.exp(-float(v))))
        y, s_2u = K.gelu_tanh(v)
        t = math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))
        assert np.isclose(s_2u, 0.5 * (1 + t)) and np.isclose(y, 0.5 * float(v) * (1 + t))
        assert np.isfinite(K.gelu_tanh_backward(1.0, v, s_2u)) and np.isfinite(K.tanh_backward(1.0, t))
        assert np.isclose(K.silu(v)[0], float(v) * s)


def test_gelu_tanh_matches_the_tanh_formula_and_backward_writes_into_out():
    x = np.concatenate([np.linspace(-12, 12, 101), RNG.standard_normal(50)])
    y, s = K.gelu_tanh(x)
    np.testing.assert_allclose(y, 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
                               rtol=1e-13, atol=1e-15)
    c = RNG.standard_normal(x.shape)
    g = K.gelu_tanh_backward(c, x, s)
    assert check_function(lambda x_: float(np.sum(K.gelu_tanh(x_)[0] * c)), [x], [g], full_max=200)["input0"] < 1e-7
    buf = c.copy()
    assert K.gelu_tanh_backward(buf, x, s, out=buf) is buf
    np.testing.assert_array_equal(buf, g)


def test_row_mean_and_col_sum_over_leading_axes():
    x = RNG.standard_normal((3, 4, 5))
    np.testing.assert_allclose(K.row_mean(x), x.mean(-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(K.col_sum(x), x.sum((0, 1)), rtol=1e-12)
    assert K.row_mean(x.astype(np.float32)).dtype == np.float32 and K.col_sum(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_dropout_mask_values_rate_and_reproducibility(dtype):
    p = 0.3
    m = K.dropout_mask(np.random.default_rng(5), (200, 50), p, dtype)
    assert m.dtype == (np.float64 if dtype == np.int64 else dtype)
    scale = m.dtype.type(1.0 / (1.0 - p))
    assert set(np.unique(m).tolist()) == {0.0, float(scale)}
    assert abs((m == 0).mean() - p) < 0.02
    np.testing.assert_array_equal(m, K.dropout_mask(np.random.default_rng(5), (200, 50), p, dtype))


@pytest.mark.parametrize("rows", [1, 7, 40])  # one chunk, chunks with a short last one (chunk = 3 rows below)
def test_gelu_tanh_with_derivative_matches_forward_and_backward_kernels(monkeypatch, rows):
    """The training kernel (bias, GELU and dGELU/dx chunk by chunk) equals gelu_tanh and gelu_tanh_backward, and its
    derivative passes a central-difference check; in place (dydx = x) it overwrites x with the derivative."""
    monkeypatch.setattr(K, "GELU_CHUNK_ELEMS", 15)  # F = 5: 3 rows per chunk
    x = RNG.standard_normal((rows, 5)) * 3
    b = RNG.standard_normal(5)
    y, d = K.gelu_tanh_with_derivative(x.copy(), bias=b)
    y_ref, s = K.gelu_tanh(x + b)
    np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(d, K.gelu_tanh_backward(np.ones_like(x), x + b, s), rtol=1e-13, atol=1e-15)
    assert grad_err(lambda x_: K.gelu_tanh(x_)[0], x, lambda c: c * K.gelu_tanh_with_derivative(x.copy())[1]) < 1e-7
    h = x.copy()
    y2, d2 = K.gelu_tanh_with_derivative(h, dydx=h, bias=b)
    assert d2 is h and np.array_equal(d2, d) and np.array_equal(y2, y)


def test_gelu_tanh_with_derivative_extremes_without_warnings():
    x = np.array([[-1000.0, -20.0, 0.0, 20.0, 1000.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, d = K.gelu_tanh_with_derivative(x.copy())
    assert y.dtype == d.dtype == np.float32 and np.isfinite(y).all() and np.isfinite(d).all()
    np.testing.assert_array_equal(y, [[0, 0, 0, 20, 1000]])
    np.testing.assert_array_equal(d[0, [0, 2, 4]], [0, 0.5, 1])


def test_gelu_tanh_with_derivative_takes_non_contiguous_input_and_rejects_bad_destinations():
    x = RNG.standard_normal((6, 4)).T  # (4, 6), Fortran order
    y, d = K.gelu_tanh_with_derivative(x)
    y_ref, s = K.gelu_tanh(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-14)
    # atol: d crosses 0 near x = -0.75, where it is a difference of O(1) terms
    np.testing.assert_allclose(d, K.gelu_tanh_backward(np.ones_like(x), x, s), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gelu_tanh_with_derivative(np.ascontiguousarray(x), y=np.empty((6, 4)).T)


@pytest.mark.parametrize("shape", [(7, 5), (130, 64), (3, 4, 1000), (65, 128), (5,)])
@pytest.mark.parametrize("ufunc", [np.add, np.multiply, np.subtract])
def test_row_op_equals_plain_broadcast(shape, ufunc, monkeypatch):
    """row_op views R rows as one long row against the vector tiled R times (a remainder of rows done plainly):
    the same values as NumPy's broadcast, for row counts that do and do not divide by R, 1-D input, and in place."""
    monkeypatch.setattr(K, "ROW_TILE_ELEMS", 256)
    a = RNG.standard_normal(shape).astype(np.float32)
    v = RNG.standard_normal(shape[-1]).astype(np.float32)
    np.testing.assert_array_equal(K.row_op(ufunc, a, v), ufunc(a, v))
    b = a.copy()
    K.row_op(ufunc, b, v, out=b)
    np.testing.assert_array_equal(b, ufunc(a, v))
    nc = np.asfortranarray(a)  # not C-contiguous: the plain broadcast path
    np.testing.assert_array_equal(K.row_op(ufunc, nc, v), ufunc(a, v))
    c = a.copy()
    K.add_row_(c, v)
    np.testing.assert_array_equal(c, a + v)
