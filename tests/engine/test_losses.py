"""Losses: float64 gradient checks, closed-form values, the sum/count contract, and torch where installed."""
import numpy as np
import pytest

from ndtrain.engine import losses as L
from ndtrain.engine.gradcheck import check_function

RNG = np.random.default_rng(0)


def _assert_gradcheck(fn, x, g, tol=1e-6):
    errs = check_function(fn, [x], [g])
    assert errs and max(errs.values()) < tol, errs


# -- gradient checks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mse", "mae", "huber", "bce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elementwise_losses_gradcheck(name, reduction):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5)) * 2
    y = rng.uniform(0, 1, (4, 5)) if name == "bce_with_logits" else rng.standard_normal((4, 5))
    # keep |x - y| away from the kinks of mae (0) and huber (|d| = delta)
    d = x - y
    x = np.where(np.abs(d) < 0.05, x + 0.2, x)
    x = np.where(np.abs(np.abs(x - y) - 1.0) < 0.05, x + 0.2, x)
    fn = getattr(L, name)
    out = fn(x, y, reduction=reduction)
    _assert_gradcheck(lambda xx: fn(xx, y, reduction=reduction)[0], x, out[1])


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradcheck_with_ignore_and_smoothing(eps, reduction):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 3, 6))
    targets = rng.integers(0, 6, (2, 3))
    targets[0, 1] = targets[1, 2] = -100
    out = L.cross_entropy(logits, targets, label_smoothing=eps, reduction=reduction)
    _assert_gradcheck(lambda z: L.cross_entropy(z, targets, label_smoothing=eps, reduction=reduction)[0],
                      logits, out[1])
    assert np.all(out[1][0, 1] == 0) and np.all(out[1][1, 2] == 0)


# -- values ----------------------------------------------------------------------------------------------------------
def test_regression_values_closed_form():
    x = np.array([0.0, 1.0, -2.0, 3.5])
    y = np.array([0.5, 1.0, 1.0, 0.0])
    d = x - y
    assert L.mse(x, y)[0] == pytest.approx(np.mean(d ** 2))
    assert L.mae(x, y)[0] == pytest.approx(np.mean(np.abs(d)))
    # huber, delta 1: 0.125, 0, 1*(3 - .5), 1*(3.5 - .5)
    assert L.huber(x, y, delta=1.0)[0] == pytest.approx((0.125 + 0 + 2.5 + 3.0) / 4)
    s, g, n = L.huber(x, y, delta=1.0, reduction="sum")
    assert s == pytest.approx(5.625) and n == 4
    np.testing.assert_allclose(g, [-0.5, 0.0, -1.0, 1.0])
    np.testing.assert_allclose(L.mae(x, y, reduction="sum")[1], np.sign(d))


def test_bce_is_stable_for_huge_logits():
    x = np.array([1000.0, -1000.0, 0.0], dtype=np.float32)
    y = np.array([1.0, 1.0, 0.5], dtype=np.float32)
    loss, g = L.bce_with_logits(x, y, reduction="mean")
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    assert loss == pytest.approx((0.0 + 1000.0 + np.log(2.0)) / 3, rel=1e-6)
    np.testing.assert_allclose(g, np.array([0.0, -1.0, 0.0]) / 3, atol=1e-7)
    assert g.dtype == np.float32


def test_cross_entropy_closed_form_and_count():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    targets = np.array([2, -100, 0])
    lse = np.log(np.exp(logits).sum(axis=1))
    expect = [lse[0] - 3.0, lse[2] - 5.0]
    s, g, n = L.cross_entropy(logits, targets, reduction="sum")
    assert n == 2 == L.count_real(targets) and s == pytest.approx(sum(expect))
    p = np.exp(logits - lse[:, None])
    np.testing.assert_allclose(g[0], p[0] - [0, 0, 1])
    np.testing.assert_array_equal(g[1], 0)
    mean, gm = L.cross_entropy(logits, targets)
    assert mean == pytest.approx(s / 2)
    np.testing.assert_allclose(gm, g / 2)
    # label smoothing: target (1-eps) onehot + eps/K
    eps = 0.3
    ls, _, _ = L.cross_entropy(logits, targets, label_smoothing=eps, reduction="sum")
    logp = logits - lse[:, None]
    q0 = np.full(3, eps / 3); q0[2] += 1 - eps
    q2 = np.full(3, eps / 3); q2[0] += 1 - eps
    assert ls == pytest.approx(-(q0 @ logp[0]) - (q2 @ logp[2]))


def test_cross_entropy_fused_scale_inplace_and_float32():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((8, 50)).astype(np.float32) * 5
    targets = rng.integers(0, 50, 8)
    targets[3] = -100
    ref_loss, ref_g = L.cross_entropy(logits.astype(np.float64), targets)
    s, n, grad_fn = L.cross_entropy_fused(logits, targets)
    assert n == 7 and s / n == pytest.approx(ref_loss, rel=1e-6)
    buf = logits.copy()
    s2, n2, grad_fn2 = L.cross_entropy_fused(buf, targets, inplace=True)
    g2 = grad_fn2(1.0 / n2)
    assert np.shares_memory(g2, buf) and g2.dtype == np.float32
    np.testing.assert_allclose(g2, ref_g, atol=1e-6)
    np.testing.assert_allclose(grad_fn(0.5), ref_g * 7 * 0.5, atol=1e-6)


def test_cross_entropy_all_ignored_and_bad_targets():
    logits = np.zeros((2, 3))
    loss, g = L.cross_entropy(logits, np.array([-100, -100]))
    assert loss == 0.0 and not g.any()
    with pytest.raises(ValueError, match="target 3 at flat row 1"):
        L.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="reduction"):
        L.cross_entropy(logits, np.array([0, 1]), reduction="avg")


# -- against torch ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_matches_torch(eps):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 5, 7))
    targets = rng.integers(0, 7, (3, 5))
    targets[0, :2] = 0  # PAD
    for reduction in ("mean", "sum"):
        tl = torch.tensor(logits, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(tl.reshape(-1, 7), torch.tensor(targets).reshape(-1),
                                                ignore_index=0, label_smoothing=eps, reduction=reduction)
        ref.backward()
        out = L.cross_entropy(logits, targets, ignore_index=0, label_smoothing=eps, reduction=reduction)
        assert out[0] == pytest.approx(ref.item(), rel=1e-12)
        np.testing.assert_allclose(out[1], tl.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_elementwise_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 4)) * 3, rng.standard_normal((6, 4))
    yb = rng.uniform(0, 1, (6, 4))
    cases = [(L.mse, F.mse_loss, y, {}), (L.mae, F.l1_loss, y, {}),
             (lambda a, b, **k: L.huber(a, b, 0.7, **k), lambda a, b, **k: F.huber_loss(a, b, delta=0.7, **k), y, {}),
             (L.bce_with_logits, F.binary_cross_entropy_with_logits, yb, {})]
    for ours, theirs, tgt, _ in cases:
        for reduction in ("mean", "sum"):
            tx = torch.tensor(x, requires_grad=True)
            ref = theirs(tx, torch.tensor(tgt), reduction=reduction)
            ref.backward()
            out = ours(x, tgt, reduction=reduction)
            assert out[0] == pytest.approx(ref.item(), rel=1e-12)
            np.testing.assert_allclose(out[1], tx.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_cross_entropy_inplace_falls_back_to_a_copy():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((5, 4))
    targets = rng.integers(0, 4, 5)
    ref_loss, ref_g = L.cross_entropy(logits, targets)
    ro = logits.copy()
    ro.flags.writeable = False
    loss, g = L.cross_entropy(ro, targets, inplace=True)
    assert loss == ref_loss and np.array_equal(g, ref_g) and not np.shares_memory(g, ro)
    base = rng.standard_normal((3, 2, 4))
    nc = base.transpose(1, 0, 2)  # (2, 3, 4), not C-contiguous: reshape(-1, 4) copies, the input stays intact
    t3 = rng.integers(0, 4, (2, 3))
    ref3 = L.cross_entropy(np.ascontiguousarray(nc), t3)
    before = nc.copy()
    loss3, g3 = L.cross_entropy(nc, t3, inplace=True)
    assert loss3 == pytest.approx(ref3[0]) and np.allclose(g3, ref3[1]) and np.array_equal(nc, before)
