"""Gradient clipping: the exact torch coefficient, norms in float64, value clipping, non-finite handling."""
import math

import numpy as np
import pytest

from ndtrain.engine.clip import clip_grad_norm, clip_grad_value, grad_sq_norm


def test_clip_grad_norm_exact():
    g = np.array([3.0, 4.0, 0.0, 12.0])  # norm 13
    total = clip_grad_norm(g, 6.5)
    assert total == 13.0
    np.testing.assert_array_equal(g, np.array([3.0, 4.0, 0.0, 12.0]) * (6.5 / (13.0 + 1e-6)))
    assert np.linalg.norm(g) == pytest.approx(6.5, rel=1e-7)
    g2 = np.array([0.3, 0.4])
    assert clip_grad_norm(g2, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(g2, [0.3, 0.4])  # under the limit: untouched


def test_norm_is_accumulated_in_float64_over_blocks():
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(300_001) * 1e3).astype(np.float32)  # several blocks, a ragged tail
    ref = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert math.sqrt(grad_sq_norm(g)) == pytest.approx(ref, rel=1e-13)
    assert clip_grad_norm(g, 1.0) == pytest.approx(ref, rel=1e-13)
    assert g.dtype == np.float32 and np.linalg.norm(g.astype(np.float64)) == pytest.approx(1.0, rel=1e-6)


def test_nonfinite_norm_leaves_grads_and_can_raise():
    g = np.array([1.0, np.nan, 2.0])
    assert math.isnan(clip_grad_norm(g, 1.0))
    assert g[0] == 1.0 and g[2] == 2.0
    with pytest.raises(FloatingPointError):
        clip_grad_norm(np.array([np.inf, 1.0]), 1.0, error_if_nonfinite=True)


def test_clip_grad_value():
    g = np.array([-3.0, 0.5, 2.0], dtype=np.float32)
    clip_grad_value(g, 1.0)
    np.testing.assert_array_equal(g, [-1.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        clip_grad_value(g, 0.0)


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    g = rng.standard_normal(50)
    p = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
    p.grad = torch.tensor(g.copy())
    ref = torch.nn.utils.clip_grad_norm_([p], 2.0)
    assert clip_grad_norm(g, 2.0) == pytest.approx(ref.item(), rel=1e-14)
    np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14)
