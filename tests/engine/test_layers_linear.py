"""Linear: gradient check, forward semantics, and input_grad=False (a first layer whose input is data)."""
import numpy as np

from ndtrain.engine import ParamStore
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.layers import Linear

RNG = np.random.default_rng(7)


def test_linear_gradcheck_and_forward():
    m = Linear(5, 3)
    ParamStore.from_module(m, dtype=np.float64, seed=0)
    x = RNG.standard_normal((2, 4, 5))
    assert_gradcheck(m, [x])
    y, _ = m(x, train=False)
    np.testing.assert_allclose(y, x @ m.W.data + m.b.data, rtol=1e-13)


def test_input_grad_false_skips_dx_but_accumulates_the_same_param_grads():
    x = RNG.standard_normal((6, 5))
    dy = RNG.standard_normal((6, 3))
    grads = []
    for input_grad in (True, False):
        m = Linear(5, 3, input_grad=input_grad)
        store = ParamStore.from_module(m, dtype=np.float64, seed=0)
        _, backward = m(x, train=True)
        dx = backward(dy)
        assert (dx is None) == (not input_grad)
        backward(dy)  # grads accumulate (+=)
        grads.append(store.grad.copy())
    np.testing.assert_array_equal(grads[0], grads[1])
    m = Linear(5, 3, bias=False, input_grad=False)
    ParamStore.from_module(m, dtype=np.float64, seed=0)
    _, backward = m(x, train=True)
    assert backward(dy) is None
    np.testing.assert_allclose(m.W.grad, x.T @ dy, rtol=1e-13)
