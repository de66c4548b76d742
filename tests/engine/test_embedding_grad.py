"""The embedding gradient without np.add.at's slow path: kernels.embedding_backward (sorted ids, a sparse product)
with its scale, into strided views, and the Transformer's TokenEmbedding using it - all equal to np.add.at,
repeated ids and PAD positions included."""
import sys

import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine import kernels as K
from ndtrain.engine.transformer.embedding import TokenEmbedding

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("scipy", [True, False])
def test_scaled_scatter_into_a_strided_view_equals_add_at(scipy, monkeypatch):
    if not scipy:
        monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # the np.add.reduceat fallback
    ids = RNG.integers(0, 6, (7, 9))  # 63 ids over 6 rows: every id repeated
    ids[:, -2:] = 0  # PAD positions
    dy = RNG.standard_normal((7, 9, 4))
    base = RNG.standard_normal((4, 6))  # an untied (D, V) matrix: its .T is the (V, D) view written to
    expected = base.T.copy()
    np.add.at(expected, ids.reshape(-1), -0.7 * dy.reshape(-1, 4))
    K.embedding_backward(base.T, ids, dy, scale=-0.7)
    np.testing.assert_allclose(base.T, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [False, True])
def test_token_embedding_backward_equals_add_at(scale):
    emb = TokenEmbedding(50, 8, scale=scale)
    ParamStore.from_module(emb, dtype=np.float64, seed=0)
    ids = RNG.integers(0, 50, (6, 40))
    ids[:3, 30:] = 0  # padding at the tail of some rows
    y, backward = emb(ids, train=True)
    dy = RNG.standard_normal(y.shape)
    emb.weight.grad[...] = 1.0  # gradients accumulate into what is there
    backward(dy)
    expected = np.ones((50, 8))
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 8) * (np.sqrt(8) if scale else 1.0))
    np.testing.assert_allclose(emb.weight.grad, expected, rtol=1e-12, atol=1e-12)
