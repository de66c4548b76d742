"""Optional comparisons with PyTorch (skipped without it): forward values and gradients in float64."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ndtrain.engine import ParamStore  # noqa: E402
from ndtrain.engine.layers import GELU, BatchNorm, LayerNorm, PReLU, RMSNorm, SiLU  # noqa: E402

pytestmark = pytest.mark.torch
RNG = np.random.default_rng(3)


def torch_run(module, x, dy):
    """Forward and backward through a torch module in float64; returns (y, dx, {param: grad})."""
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))
    return yt.detach().numpy(), xt.grad.numpy(), {n: p.grad.numpy() for n, p in module.named_parameters()}


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_torch(approximate):
    x, dy = RNG.standard_normal((4, 10)) * 3, RNG.standard_normal((4, 10))
    y, bwd = GELU(approximate)(x)
    ty, tdx, _ = torch_run(torch.nn.GELU(approximate=approximate), x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bwd(dy), tdx, rtol=1e-10, atol=1e-14)


def test_silu_and_prelu_match_torch():
    x, dy = RNG.standard_normal((4, 3)) * 3, RNG.standard_normal((4, 3))
    y, bwd = SiLU()(x)
    ty, tdx, _ = torch_run(torch.nn.SiLU(), x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-12)
    np.testing.assert_allclose(bwd(dy), tdx, rtol=1e-10, atol=1e-14)
    m = PReLU(3)
    ParamStore.from_module(m, dtype=np.float64)
    y, bwd = m(x)
    ty, tdx, tg = torch_run(torch.nn.PReLU(3, dtype=torch.float64), x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-12)
    np.testing.assert_allclose(bwd(dy), tdx, rtol=1e-12)
    np.testing.assert_allclose(m.a.grad, tg["weight"], rtol=1e-12)


@pytest.mark.parametrize("cls,tcls", [(LayerNorm, torch.nn.LayerNorm), (RMSNorm, torch.nn.RMSNorm)])
def test_norms_match_torch(cls, tcls):
    D = 8
    x, dy = RNG.standard_normal((2, 5, D)) * 2 + 1, RNG.standard_normal((2, 5, D))
    m = cls(D)
    ParamStore.from_module(m, dtype=np.float64)
    m.gamma.data[...] = RNG.uniform(0.5, 1.5, D)
    tm = tcls(D, eps=m.eps, dtype=torch.float64)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(m.gamma.data))
    y, bwd = m(x)
    ty, tdx, tg = torch_run(tm, x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bwd(dy), tdx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.gamma.grad, tg["weight"], rtol=1e-10)


def test_batch_norm_matches_torch_train_running_stats_and_eval():
    D = 4
    m = BatchNorm(D, momentum=0.1, buffer_dtype=np.float64)
    ParamStore.from_module(m, dtype=np.float64)
    m.gamma.data[...] = RNG.uniform(0.5, 1.5, D)
    tm = torch.nn.BatchNorm1d(D, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(m.gamma.data))
    for _ in range(3):
        x, dy = RNG.standard_normal((16, D)) * 3 + 2, RNG.standard_normal((16, D))
        y, bwd = m(x, train=True)
        tm.train()
        tm.zero_grad()
        ty, tdx, tg = torch_run(tm, x, dy)
        np.testing.assert_allclose(y, ty, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bwd(dy), tdx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.running_mean, tm.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.running_var, tm.running_var.numpy(), rtol=1e-12)
    x = RNG.standard_normal((5, D))
    tm.eval()
    np.testing.assert_allclose(m(x, train=False)[0], tm(torch.tensor(x)).detach().numpy(), rtol=1e-10)
