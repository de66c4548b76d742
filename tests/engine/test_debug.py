"""Debugging aids: per-layer statistics, the non-finite detector, the first non-finite gradient, the LR finder."""
import math

import numpy as np
import pytest

from ndtrain.engine import Module, Param, ParamStore, Sequential
from ndtrain.engine.debug import NonFiniteError, detect_nonfinite, first_nonfinite_grad, record_stats
from ndtrain.engine.layers import Linear, ReLU
from ndtrain.engine.lr_finder import find_lr
from ndtrain.engine.module import _HOOKS
from ndtrain.engine.optim import SGD


class Poison(Module):
    """Identity that can put a NaN (or Inf) into its forward output or its returned input gradient."""

    def __init__(self, forward_bad=False, backward_bad=False, value=np.nan):
        super().__init__()
        self.forward_bad, self.backward_bad, self.value = forward_bad, backward_bad, value

    def forward(self, x, *, train):
        y = x.copy()
        if self.forward_bad:
            y.flat[3] = self.value

        def backward(dy):
            dx = dy.copy()
            if self.backward_bad:
                dx.flat[1] = self.value
            return dx

        return y, backward


def model_with(poison):
    m = Sequential(Linear(4, 6), ReLU(), Sequential(Linear(6, 6), poison), Linear(6, 3))
    ParamStore.from_module(m, dtype=np.float64, seed=0)
    return m


X = np.random.default_rng(0).standard_normal((5, 4))


def run(m, x=X):
    y, backward = m(x, train=True)
    return backward(np.ones_like(y))


# -- non-finite detection --------------------------------------------------------------------------------------------
def test_detector_names_the_layer_for_a_nan_in_forward():
    m = model_with(Poison(forward_bad=True))
    n_hooks = len(_HOOKS)
    with pytest.raises(NonFiniteError) as e:
        with detect_nonfinite(m):
            run(m)
    assert (e.value.path, e.value.phase, e.value.kind) == ("2.1", "forward", "Poison")
    assert "'2.1'" in str(e.value) and "1 NaN" in str(e.value)
    assert len(_HOOKS) == n_hooks  # removed even when the block raised


def test_detector_names_the_layer_for_an_inf_in_backward():
    m = model_with(Poison(backward_bad=True, value=np.inf))
    with pytest.raises(NonFiniteError) as e:
        with detect_nonfinite(m):
            run(m)
    assert (e.value.path, e.value.phase) == ("2.1", "backward") and "1 Inf" in str(e.value)


def test_detector_names_a_layer_with_a_nan_weight_and_is_quiet_when_finite():
    m = model_with(Poison())
    with detect_nonfinite(m):
        run(m)  # all finite: no error
    m[3].W.data[0, 0] = np.nan
    with pytest.raises(NonFiniteError) as e:
        with detect_nonfinite(m):
            run(m)
    assert (e.value.path, e.value.phase, e.value.kind) == ("3", "forward", "Linear")


def test_first_nonfinite_grad_names_the_parameter():
    m = model_with(Poison())
    store = ParamStore.from_module(m, dtype=np.float32)
    run(m, X.astype(np.float32))
    assert first_nonfinite_grad(store) is None
    m[2][0].b.grad[2] = np.inf
    m[3].W.grad[0, 1] = np.nan
    assert first_nonfinite_grad(store) == "2.0.b"


# -- statistics ------------------------------------------------------------------------------------------------------
def test_record_stats_finds_a_dead_layer_and_measures_grads():
    m = Sequential(Linear(4, 8), ReLU(), Linear(8, 8), ReLU(), Linear(8, 2))
    ParamStore.from_module(m, dtype=np.float64, seed=1)
    m[2].b.data[:] = -1e3  # every pre-activation of the second ReLU is negative: dead
    with record_stats(m) as stats:
        y, backward = m(X, train=True)
        dy = np.random.default_rng(2).standard_normal(y.shape)
        dx = backward(dy)
    assert stats.dead_layers() == ["3"]
    assert stats["3"].dead_fraction == 1.0 and 0.05 < stats["1"].dead_fraction < 0.95
    assert stats["0"].dead_fraction is None  # not ReLU-like
    h = X @ m[0].W.data + m[0].b.data
    assert stats["0"].mean == pytest.approx(h.mean()) and stats["0"].std == pytest.approx(h.std())
    assert stats["<root>"].input_grad_norm == pytest.approx(np.linalg.norm(dx))
    assert stats["4"].input_grad_norm == pytest.approx(np.linalg.norm(dy @ m[4].W.data.T))
    w_norm = math.sqrt(np.sum(m[4].W.grad ** 2) + np.sum(m[4].b.grad ** 2))
    assert stats["4"].param_grad_norm == pytest.approx(w_norm)
    assert stats["2"].param_grad_norm == 0.0  # behind a dead ReLU nothing flows
    assert stats["1"].param_grad_norm is None  # no Params
    assert "3" in stats.table()


def test_record_stats_accumulates_over_repeated_calls():
    lin = Linear(4, 4)
    ParamStore.from_module(lin, dtype=np.float64)
    with record_stats(lin) as stats:
        a, _ = lin(X, train=False)
        b, _ = lin(2 * X, train=False)
    both = np.concatenate([a.ravel(), b.ravel()])
    s = stats["<root>"]
    assert s.calls == 2 and s.n == both.size and s.mean == pytest.approx(both.mean())
    assert s.std == pytest.approx(both.std())


# -- LR finder -------------------------------------------------------------------------------------------------------
class Quadratic(Module):
    """loss = 0.5 sum_i a_i w_i^2 with curvatures a in [1, 10]: plain SGD diverges above lr = 2 / 10."""

    def __init__(self):
        super().__init__()
        self.w = Param((20,), init=lambda rng, shape, dtype: rng.standard_normal(shape).astype(dtype))


def test_lr_finder_suggests_a_sane_lr_and_restores_state():
    model = Quadratic()
    store = ParamStore.from_module(model, dtype=np.float64, seed=3)
    a = np.linspace(1.0, 10.0, 20)
    opt = SGD(store, lr=0.0, momentum=0.5)
    w0 = store.data.copy()

    def step(lr):
        w = model.w.data
        store.zero_grad()
        model.w.grad += a * w
        loss = 0.5 * float(np.sum(a * w * w))
        opt.step(lr=lr)
        return loss

    res = find_lr(step, min_lr=1e-5, max_lr=10.0, num_steps=80, store=store, optimizer=opt)
    assert res.diverged and len(res.lrs) < 80  # stopped at divergence
    assert 1e-3 <= res.suggested_lr <= 0.2, res.suggested_lr
    assert np.array_equal(store.data, w0) and opt.step_count == 0 and not opt.state["momentum_buffer"].any()
    assert res.lrs[0] == pytest.approx(1e-5) and res.lrs[1] / res.lrs[0] == pytest.approx(1e6 ** (1 / 79))


def test_lr_finder_stops_on_nan_and_validates():
    res = find_lr(lambda lr: 1.0 if lr < 1e-3 else math.nan, min_lr=1e-6, max_lr=1.0, num_steps=30)
    assert res.diverged and all(lr < 1e-3 for lr in res.lrs) and len(res.losses) == len(res.lrs)
    with pytest.raises(ValueError, match="min_lr"):
        find_lr(lambda lr: 1.0, min_lr=1.0, max_lr=0.1)
