"""The flat parameter store, the module registry and the gradient checker itself."""
import numpy as np
import pytest

from ndtrain.engine import Module, ModuleList, ParamStore, Sequential
from ndtrain.engine import init
from ndtrain.engine.gradcheck import assert_gradcheck, check_module
from ndtrain.engine.layers import Linear
from ndtrain.engine.module import seed_rngs


def test_params_are_views_into_one_buffer():
    m = Sequential(Linear(3, 4), Linear(4, 2))
    store = ParamStore.from_module(m, seed=1)
    assert store.size == 3 * 4 + 4 + 4 * 2 + 2
    assert [r["name"] for r in store.layout()] == ["0.W", "0.b", "1.W", "1.b"]
    assert [r["offset"] for r in store.layout()] == [0, 12, 16, 24]
    store.data[:] = np.arange(store.size)
    np.testing.assert_array_equal(m[1].W.data, np.arange(16, 24).reshape(4, 2))
    m[0].b.grad += 1.0
    assert store.grad[12:16].tolist() == [1.0] * 4 and store.grad.sum() == 4.0


def test_decay_mask_and_dtype():
    m = Linear(2, 3)
    store = ParamStore.from_module(m, dtype=np.float64)
    assert store.data.dtype == np.float64 and m.W.data.dtype == np.float64
    assert store.decay_mask().tolist() == [True] * 6 + [False] * 3


def test_init_is_deterministic_by_seed():
    a = ParamStore.from_module(Sequential(Linear(5, 5), Linear(5, 5)), seed=7)
    b = ParamStore.from_module(Sequential(Linear(5, 5), Linear(5, 5)), seed=7)
    c = ParamStore.from_module(Sequential(Linear(5, 5), Linear(5, 5)), seed=8)
    assert a.checksum() == b.checksum() != c.checksum()


class Tied(Module):
    def __init__(self):
        super().__init__()
        self.enc = Linear(3, 3, bias=False)
        self.dec = Linear(3, 3, bias=False)
        self.dec.W = self.enc.W  # one Param, two names

    def forward(self, x, *, train):
        h, b1 = self.enc(x, train=train)
        y, b2 = self.dec(h, train=train)
        return y, lambda dy: b1(b2(dy))


def test_tied_params_share_one_segment_and_grads_accumulate():
    m = Tied()
    store = ParamStore.from_module(m, dtype=np.float64)
    assert store.size == 9 and store.aliases == {"dec.W": "enc.W"}
    assert store["dec.W"] is store["enc.W"]
    assert_gradcheck(m, [np.random.default_rng(0).standard_normal((4, 3))])


def test_gradcheck_detects_a_wrong_backward():
    class Wrong(Linear):
        def forward(self, x, *, train):
            y, bwd = super().forward(x, train=train)
            return y, lambda dy: bwd(dy) * 1.001  # input gradient slightly off

    m = Wrong(3, 2)
    with pytest.raises(AssertionError, match="input0"):
        assert_gradcheck(m, [np.random.default_rng(0).standard_normal((4, 3))])


def test_gradcheck_large_tensors_use_directions():
    m = Linear(20, 30)
    errs = check_module(m, [np.random.default_rng(0).standard_normal((5, 20))], full_max=10)
    assert max(errs.values()) < 1e-6 and set(errs) == {"W", "b", "input0"}


def test_module_paths_train_mode_and_state_dict():
    m = Sequential(Linear(2, 2), ModuleList([Linear(2, 2)]))
    names = [n for n, _ in m.named_modules()]
    assert names == ["", "0", "1", "1.0"]
    assert m[1][0].path == "1.0"
    m.eval()
    assert not any(x.training for _, x in m.named_modules())
    store = ParamStore.from_module(Sequential(Linear(2, 2)))
    sd = store.state_dict()
    sd["0.W"][...] = 3.0
    store.load_state_dict(sd)
    assert (store.data[:4] == 3.0).all()
    with pytest.raises(ValueError, match="0.b"):
        store.load_state_dict({"0.W": sd["0.W"], "0.b": np.zeros(5)})


def test_seed_rngs_is_reproducible():
    class Noisy(Module):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(0)

    a, b = Sequential(Noisy(), Noisy()), Sequential(Noisy(), Noisy())
    seed_rngs(a, 5)
    seed_rngs(b, 5)
    x = [m.rng.random() for m in a.layers]
    assert x == [m.rng.random() for m in b.layers] and x[0] != x[1]


@pytest.mark.parametrize("factory,expected_std", [
    (init.xavier_normal(), np.sqrt(2 / (300 + 200))),
    (init.kaiming_normal(), np.sqrt(2 / 300)),
    (init.xavier_uniform(), np.sqrt(6 / 500) / np.sqrt(3)),
    (init.kaiming_uniform(), np.sqrt(6 / 300) / np.sqrt(3)),
])
def test_initializer_scales(factory, expected_std):
    w = factory(np.random.default_rng(0), (300, 200), np.float64)
    assert abs(w.std() / expected_std - 1) < 0.02 and abs(w.mean()) < 0.01 * expected_std * 10


def test_buffers_are_registered_with_paths():
    class BN(Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", np.zeros(3))

    m = Sequential(BN(), BN())
    names = [n for n, _ in m.named_buffers()]
    assert names == ["0.running_mean", "1.running_mean"]
    m[1].running_mean[...] = 2.0
    assert dict(m.named_buffers())["1.running_mean"].tolist() == [2.0, 2.0, 2.0]
