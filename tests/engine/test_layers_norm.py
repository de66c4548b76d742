"""LayerNorm, RMSNorm and BatchNorm: gradient checks and forward semantics."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, Sequential
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.layers import BatchNorm, LayerNorm, RMSNorm


def with_random_affine(m, seed=0):
    """Float64 store with gamma/beta away from their 1/0 init, so a backward that ignores them fails."""
    store = ParamStore.from_module(m, dtype=np.float64)
    store.data[...] = np.random.default_rng(seed).uniform(0.5, 1.5, store.size)
    return m


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gradcheck(bias):
    m = with_random_affine(LayerNorm(6, bias=bias))
    errs = assert_gradcheck(m, [np.random.default_rng(11).standard_normal((2, 3, 6)) * 3 + 1])
    assert set(errs) == ({"gamma", "beta", "input0"} if bias else {"gamma", "input0"})


def test_layer_norm_output_mean_zero_var_one():
    m = LayerNorm(64)
    ParamStore.from_module(m, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 7, 64)) * 10 + 3
    y, _ = m(x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-5)  # eps=1e-5 against var ~100: a 1e-7 shortfall
    with pytest.raises(ValueError, match="expected 64"):
        m(np.ones((2, 63)))


def test_rms_norm_gradcheck_and_unit_rms():
    m = with_random_affine(RMSNorm(6))
    assert_gradcheck(m, [np.random.default_rng(11).standard_normal((2, 3, 6)) * 3 + 1])
    m2 = RMSNorm(32)
    ParamStore.from_module(m2, dtype=np.float64)
    y, _ = m2(np.random.default_rng(2).standard_normal((4, 32)) * 5 + 2)
    np.testing.assert_allclose(np.sqrt((y * y).mean(-1)), 1, rtol=1e-6)


def test_norm_params_have_no_decay():
    for m in (LayerNorm(4), RMSNorm(4), BatchNorm(4)):
        store = ParamStore.from_module(m)
        assert not store.decay_mask().any(), type(m).__name__


@pytest.mark.parametrize("shape", [(7, 4), (3, 5, 4)])
def test_batch_norm_gradcheck_train(shape):
    m = with_random_affine(BatchNorm(4))
    errs = assert_gradcheck(m, [np.random.default_rng(11).standard_normal(shape) * 2 + 1], train=True)
    assert set(errs) == {"gamma", "beta", "input0"}


def test_batch_norm_gradcheck_eval():
    m = with_random_affine(BatchNorm(4))
    m.running_mean[...] = [0.5, -1, 0, 2]
    m.running_var[...] = [1, 4, 0.25, 2]
    assert_gradcheck(m, [np.random.default_rng(11).standard_normal((6, 4))], train=False)


def test_batch_norm_train_normalizes_over_all_but_last_axis():
    m = BatchNorm(3)
    ParamStore.from_module(m, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 5, 3)) * [1, 10, 100] + [0, 5, -5]
    y, _ = m(x, train=True)
    np.testing.assert_allclose(y.reshape(-1, 3).mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(y.reshape(-1, 3).var(0), 1, rtol=1e-4)


def test_batch_norm_running_stats_closed_form_then_eval():
    rng = np.random.default_rng(0)
    mom = 0.2
    m = BatchNorm(3, momentum=mom, buffer_dtype=np.float64)
    ParamStore.from_module(m, dtype=np.float64)
    batches = [rng.standard_normal((8, 3)) * s + c for s, c in [(1, 0), (2, 1), (0.5, -3)]]
    rm, rv = np.zeros(3), np.ones(3)
    for b in batches:
        m(b, train=True)
        rm = (1 - mom) * rm + mom * b.mean(0)
        rv = (1 - mom) * rv + mom * b.var(0, ddof=1)  # PyTorch: unbiased variance in the running estimate
    np.testing.assert_allclose(m.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(m.running_var, rv, rtol=1e-12)
    assert dict(m.named_buffers()).keys() == {"running_mean", "running_var"}
    # eval uses the running statistics and does not touch them
    x = rng.standard_normal((5, 3))
    m.eval()
    y, _ = m(x)
    np.testing.assert_allclose(y, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(m.running_mean, rm, rtol=0)
    # train and eval differ on the same batch
    y_train, _ = m(x, train=True)
    assert not np.allclose(y, y_train)


def test_batch_norm_in_a_model_float32_buffers_and_errors():
    net = Sequential(BatchNorm(4))
    store = ParamStore.from_module(net)
    assert store.size == 8 and [n for n, _ in net.named_buffers()] == ["0.running_mean", "0.running_var"]
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    y, bwd = net(x, train=True)
    assert y.dtype == np.float32 and bwd(np.ones_like(y)).dtype == np.float32
    y, _ = net(x, train=False)
    assert y.dtype == np.float32
    with pytest.raises(ValueError, match="more than 1 value"):
        net(x[:1], train=True)
