"""SwiGLU (gradient check, forward against its definition) and the perceptron (AND yes, XOR no)."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.layers import Perceptron, SwiGLU


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_gradcheck(bias):
    m = SwiGLU(5, 4, bias=bias)
    errs = assert_gradcheck(m, [np.random.default_rng(7).standard_normal((2, 3, 5))])
    assert set(errs) == ({"W_gate_up", "b", "input0"} if bias else {"W_gate_up", "input0"})


def test_swiglu_forward_is_silu_gate_times_value():
    m = SwiGLU(6, 3)
    store = ParamStore.from_module(m, dtype=np.float64)
    assert store.size == 6 * 6
    x = np.random.default_rng(0).standard_normal((4, 6))
    W, V = m.W_gate_up.data[:, :3], m.W_gate_up.data[:, 3:]
    a = x @ W
    expected = a / (1 + np.exp(-a)) * (x @ V)
    y, _ = m(x)
    assert y.shape == (4, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


AND_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)


def test_perceptron_learns_and():
    p = Perceptron(2)
    errors = p.fit(AND_X, np.array([0, 0, 0, 1]), epochs=20)
    assert errors[0] > 0 and errors[-1] == 0
    np.testing.assert_array_equal(p.predict(AND_X), [0, 0, 0, 1])
    y, bwd = p(AND_X)
    np.testing.assert_array_equal(y, [0, 0, 0, 1])
    with pytest.raises(NotImplementedError, match="perceptron rule"):
        bwd(np.ones(4))


def test_perceptron_cannot_learn_xor():
    p = Perceptron(2)
    xor = np.array([0, 1, 1, 0])
    errors = p.fit(AND_X, xor, epochs=100)
    assert len(errors) == 100 and min(errors) > 0
    assert (p.predict(AND_X) != xor).any()


def test_perceptron_checks_inputs():
    p = Perceptron(3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        p.fit(AND_X, np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="0 or 1"):
        p.fit(np.zeros((2, 3)), np.array([0, 2]))
