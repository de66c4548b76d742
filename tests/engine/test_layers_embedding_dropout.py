"""Embedding and Dropout: gradient checks and forward semantics."""
import numpy as np
import pytest

from ndtrain.engine import Module, ParamStore, Sequential
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.layers import Dropout, Embedding, Linear
from ndtrain.engine.module import seed_rngs


class MaskedPadding(Module):
    """Embedding followed by zeroing the padding positions, as models do: the padding row then has no effect on
    the loss, so its numeric gradient is 0, which is what Embedding's backward gives it by design."""

    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids, *, train):
        y, bwd = self.emb(ids, train=train)
        keep = (ids != self.emb.padding_idx)[..., None]
        return y * keep, lambda dy: bwd(dy * keep)


def test_embedding_gradcheck_repeated_ids():
    ids = np.array([[1, 3, 3, 0], [3, 5, 1, 0]])
    assert set(assert_gradcheck(Embedding(6, 3), [ids])) == {"W"}


def test_embedding_gradcheck_with_padding_idx():
    ids = np.array([[1, 3, 3, 0], [3, 5, 1, 0]])
    assert set(assert_gradcheck(MaskedPadding(Embedding(6, 3, padding_idx=0)), [ids])) == {"emb.W"}


def test_embedding_lookup_and_scatter_add_match_add_at():
    rng = np.random.default_rng(0)
    m = Embedding(50, 8)
    ParamStore.from_module(m, dtype=np.float64)
    ids = rng.integers(0, 50, (4, 30))
    y, bwd = m(ids)
    np.testing.assert_array_equal(y, m.W.data[ids])
    dy = rng.standard_normal((4, 30, 8))
    assert bwd(dy) is None
    expected = np.zeros((50, 8))
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 8))
    np.testing.assert_allclose(m.W.grad, expected, rtol=1e-12, atol=1e-12)
    bwd(dy)  # grads accumulate
    np.testing.assert_allclose(m.W.grad, 2 * expected, rtol=1e-12, atol=1e-12)


def test_embedding_padding_row_is_zero_and_gets_no_gradient():
    m = Embedding(10, 4, padding_idx=2)
    ParamStore.from_module(m, seed=3)
    assert (m.W.data[2] == 0).all() and (m.W.data[3] != 0).all()
    ids = np.array([2, 2, 5, 2])
    y, bwd = m(ids)
    assert (y[[0, 1, 3]] == 0).all()
    bwd(np.ones((4, 4), np.float32))
    assert (m.W.grad[2] == 0).all() and (m.W.grad[5] == 1).all() and m.W.grad.sum() == 4
    assert Embedding(10, 4, padding_idx=-1).padding_idx == 9


def test_embedding_init_is_standard_normal_no_decay_and_checks_ids():
    m = Embedding(400, 50)
    store = ParamStore.from_module(m, seed=0)
    assert abs(m.W.data.std() - 1) < 0.02 and abs(m.W.data.mean()) < 0.02
    assert not store.decay_mask().any()
    with pytest.raises(IndexError, match="id 400"):
        m(np.array([1, 400]))
    with pytest.raises(IndexError, match="id -1"):
        m(np.array([-1, 3]))
    with pytest.raises(TypeError, match="integers"):
        m(np.array([1.0]))


def test_dropout_scaling_zero_fraction_and_eval_identity():
    d = Dropout(0.25)
    x = np.full((400, 500), 2.0, np.float32)
    y, bwd = d(x, train=True)
    zero_frac = (y == 0).mean()
    assert abs(zero_frac - 0.25) < 0.005  # 200k Bernoulli draws: sd ~0.001
    np.testing.assert_allclose(y[y != 0], 2.0 / 0.75, rtol=1e-6)
    assert abs(y.mean() / 2.0 - 1) < 0.01  # expectation preserved
    dx = bwd(np.ones_like(y))
    np.testing.assert_array_equal(dx == 0, y == 0)  # the same mask in backward
    ye, bwde = d(x, train=False)
    assert ye is x and bwde(x) is x
    y0, _ = Dropout(0.0)(x, train=True)
    assert y0 is x
    y1, b1 = Dropout(1.0)(x, train=True)
    assert (y1 == 0).all() and (b1(x) == 0).all()
    with pytest.raises(ValueError, match="p must be"):
        Dropout(1.5)


def test_dropout_gradcheck_with_reseeded_mask():
    d = Dropout(0.4)

    def reseed():
        d.rng = np.random.default_rng(123)

    x = np.random.default_rng(0).standard_normal((5, 6))
    errs = assert_gradcheck(d, [x], before_forward=reseed)
    assert errs["input0"] < 1e-9
    # inside a model, with a parameter upstream of the dropout
    net = Sequential(Linear(6, 4), Dropout(0.3))
    assert_gradcheck(net, [x], before_forward=lambda: seed_rngs(net, 7))


def test_dropout_masks_repeat_with_seed_rngs_and_differ_between_layers():
    net_a, net_b = Sequential(Dropout(0.5), Dropout(0.5)), Sequential(Dropout(0.5), Dropout(0.5))
    seed_rngs(net_a, 1)
    seed_rngs(net_b, 1)
    x = np.ones((20, 20))
    ya = net_a[0](x, train=True)[0]
    assert np.array_equal(ya, net_b[0](x, train=True)[0])
    assert not np.array_equal(net_a[1](x, train=True)[0], ya)
