"""Activations and Softmax: float64 gradient checks and forward semantics."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.kernels import MASK_VALUE
from ndtrain.engine.layers import GELU, PReLU, ReLU, LeakyReLU, SiLU, Sigmoid, Softmax, Swish, Tanh


def away_from_kinks(shape, seed=0, margin=0.1):
    """Random float64 values with |x| >= margin, so central differences never straddle 0."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.where(x >= 0, x + margin, x - margin)


@pytest.mark.parametrize("layer", [ReLU(), LeakyReLU(0.1), LeakyReLU(1.5), LeakyReLU(-0.2), Sigmoid(), Tanh(),
                                   GELU("tanh"), GELU("none"), SiLU(), Softmax(-1), Softmax(0)],
                         ids=lambda m: type(m).__name__ + str(getattr(m, "slope", getattr(m, "approximate", ""))))
def test_gradcheck_elementwise(layer):
    assert_gradcheck(layer, [away_from_kinks((3, 4, 5))])


@pytest.mark.parametrize("n", [1, 5])
def test_gradcheck_prelu(n):
    m = PReLU(n)
    ParamStore.from_module(m, dtype=np.float64)
    m.a.data[...] = np.linspace(0.1, 0.4, n)  # distinct per-channel slopes
    errs = assert_gradcheck(m, [away_from_kinks((4, 3, 5))])
    assert set(errs) == {"a", "input0"}


def test_prelu_per_channel_forward_and_shape_error():
    m = PReLU(2)
    ParamStore.from_module(m, dtype=np.float64)
    m.a.data[...] = [0.5, 2.0]
    y, _ = m(np.array([[-1.0, -1.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(y, [[-0.5, -2.0], [3.0, 4.0]])
    assert m.a.decay is False
    with pytest.raises(ValueError, match="expected 2"):
        m(np.ones((2, 3)))


def test_relu_and_leaky_forward_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_array_equal(ReLU()(x)[0], [0, 0, 0, 0.5, 2.0])
    np.testing.assert_allclose(LeakyReLU(0.1)(x)[0], [-0.2, -0.05, 0, 0.5, 2.0])
    np.testing.assert_allclose(LeakyReLU(2.0)(x)[0], [-4.0, -1.0, 0, 0.5, 2.0])
    y, bwd = ReLU()(x)
    np.testing.assert_array_equal(bwd(np.ones(5)), [0, 0, 0, 1, 1])


def test_activations_keep_float32():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for layer in [ReLU(), LeakyReLU(), Sigmoid(), Tanh(), GELU(), GELU("none"), SiLU(), Softmax()]:
        y, bwd = layer(x)
        assert y.dtype == np.float32 and bwd(np.ones_like(y)).dtype == np.float32, type(layer).__name__


def test_gelu_exact_vs_tanh_close():
    x = np.linspace(-6, 6, 1001)
    exact, _ = GELU("none")(x)
    approx, _ = GELU("tanh")(x)
    assert np.abs(exact - approx).max() < 1e-3
    assert np.abs(exact - approx).max() > 0  # they are different functions
    assert exact[0] > -1e-7 and abs(exact[-1] - 6) < 1e-7  # -> 0 and -> x in the tails
    with pytest.raises(ValueError, match="approximate"):
        GELU("erf")


def test_silu_is_x_sigmoid_and_swish_alias():
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(SiLU()(x)[0], x / (1 + np.exp(-x)), rtol=1e-12)
    assert Swish is SiLU


def test_softmax_rows_sum_to_one_and_masked_row_is_finite():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6)) * 20
    x[1, 2, :] = MASK_VALUE  # a fully masked row
    x[0, 1, 3:] = MASK_VALUE  # a partly masked row
    x32 = x.astype(np.float32)
    for inp in (x, x32):
        p, bwd = Softmax()(inp)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(p[1, 2], 1 / 6, rtol=1e-6)
        assert (p[0, 1, 3:] == 0).all()
        assert np.isfinite(bwd(np.ones_like(p))).all()
    p0, _ = Softmax(axis=0)(x)
    np.testing.assert_allclose(p0.sum(0), 1.0, rtol=1e-12)
