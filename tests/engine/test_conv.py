"""Conv1d / Conv2d / pooling / Flatten: float64 gradient checks over padding, stride and dilation variants, shape
semantics, and forward (and gradient) equality with torch when it is installed."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, Sequential
from ndtrain.engine.conv import AvgPool2d, Conv1d, Conv2d, Flatten, GlobalAvgPool, MaxPool2d
from ndtrain.engine.gradcheck import assert_gradcheck

CONV2D_CASES = [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=(2, 3), padding="same", dilation=(2, 1)),  # even kernel: asymmetric "same"
    dict(kernel_size=3, padding="valid", stride=2),
    dict(kernel_size=3, padding=1, stride=(2, 1), dilation=2),
    dict(kernel_size=1, padding=0, bias=False),
]


@pytest.mark.parametrize("case", CONV2D_CASES, ids=str)
def test_conv2d_gradcheck(case):
    rng = np.random.default_rng(0)
    m = Conv2d(3, 4, **case)
    assert_gradcheck(m, [rng.standard_normal((2, 3, 7, 6))])


@pytest.mark.parametrize("case", [dict(kernel_size=3, padding="same"), dict(kernel_size=4, padding="same"),
                                  dict(kernel_size=3, stride=2, dilation=2, padding=2)], ids=str)
def test_conv1d_gradcheck(case):
    rng = np.random.default_rng(1)
    assert_gradcheck(Conv1d(2, 3, **case), [rng.standard_normal((2, 2, 11))])


def test_output_shapes():
    for case, shape in [(dict(kernel_size=3, padding="same"), (2, 4, 9, 8)),
                        (dict(kernel_size=3, stride=2), (2, 4, 4, 3)),
                        (dict(kernel_size=3, padding=2, dilation=2), (2, 4, 9, 8))]:
        m = Conv2d(3, 4, **case)
        ParamStore.from_module(m)
        y, _ = m(np.zeros((2, 3, 9, 8), np.float32), train=False)
        assert y.shape == shape and y.dtype == np.float32, case
    with pytest.raises(ValueError, match="stride 1"):
        Conv2d(3, 4, 3, stride=2, padding="same")


def _distinct(rng, shape):
    """Values with no ties inside any pooling window (gradients of max are ill-defined at ties)."""
    return rng.permutation(np.prod(shape)).reshape(shape) / 10.0 + rng.uniform(0, 0.01, shape)


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("geom", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(2, 3), stride=1)], ids=str)
def test_pool_gradcheck(cls, geom):
    rng = np.random.default_rng(2)
    assert_gradcheck(cls(**geom), [_distinct(rng, (2, 3, 7, 6))])


def test_maxpool_picks_the_max_and_routes_gradient():
    x = np.array([[[[1., 5., 2., 0.], [3., 4., 8., 7.], [0., 0., 1., 1.5], [2., 9., 3., 1.]]]])
    (y, bwd) = MaxPool2d(2)(x, train=True)
    np.testing.assert_array_equal(y[0, 0], [[5., 8.], [9., 3.]])
    dx = bwd(np.ones_like(y))
    assert dx.sum() == 4 and dx[0, 0, 0, 1] == dx[0, 0, 1, 2] == dx[0, 0, 3, 1] == dx[0, 0, 3, 2] == 1


def test_global_avg_pool_and_flatten():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    y, _ = GlobalAvgPool()(x, train=False)
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)))
    assert_gradcheck(GlobalAvgPool(), [x])
    f, bwd = Flatten()(x, train=False)
    assert f.shape == (2, 60) and bwd(f).shape == x.shape
    assert_gradcheck(Flatten(), [x])


def test_small_cnn_gradcheck_end_to_end():
    from ndtrain.engine.layers import Linear
    rng = np.random.default_rng(4)
    m = Sequential(Conv2d(1, 3, 3, padding="same"), MaxPool2d(2), Conv2d(3, 4, 3, padding=1, stride=2),
                   AvgPool2d(2, stride=1), Flatten(), Linear(4, 2))
    assert_gradcheck(m, [_distinct(rng, (2, 1, 8, 8))])


# -- against torch --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV2D_CASES, ids=str)
def test_conv2d_equals_torch(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    m = Conv2d(3, 4, **case)
    ParamStore.from_module(m, dtype=np.float64, seed=1)
    kw = {k: v for k, v in case.items()}
    tm = torch.nn.Conv2d(3, 4, **kw).double()
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(m.W.data))
        if m.b is not None:
            tm.bias.copy_(torch.from_numpy(m.b.data))
    x = rng.standard_normal((2, 3, 7, 6))
    y, bwd = m(x, train=True)
    xt = torch.from_numpy(x).requires_grad_()
    yt = tm(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = bwd(dy)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.W.grad, tm.weight.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_conv1d_and_pools_equal_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    m = Conv1d(2, 3, 4, padding="same", dilation=2)
    ParamStore.from_module(m, dtype=np.float64, seed=2)
    tm = torch.nn.Conv1d(2, 3, 4, padding="same", dilation=2).double()
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(m.W.data))
        tm.bias.copy_(torch.from_numpy(m.b.data))
    x = rng.standard_normal((2, 2, 9))
    np.testing.assert_allclose(m(x, train=False)[0], tm(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)
    x = _distinct(rng, (2, 3, 7, 6))
    for ours, theirs in [(MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)),
                         (AvgPool2d(3, 2, 1), torch.nn.AvgPool2d(3, 2, 1))]:
        np.testing.assert_allclose(ours(x, train=False)[0], theirs(torch.from_numpy(x)).numpy(), rtol=1e-12)


def test_im2col_paths_agree():
    """Few channels take the slice-copy path, many the windowed gather: both give the same columns."""
    from ndtrain.engine.conv.im2col import im2col
    rng = np.random.default_rng(7)
    for C in (1, 3, 8, 9):
        x = rng.standard_normal((2, C, 7, 6))
        pads, k, s, d = ((1, 2), (0, 1)), (3, 2), (2, 1), (1, 2)
        cols = im2col(x, pads, k, s, d)
        xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
        Ho, Wo = (7 + 3 - 2 - 1) // 2 + 1, (6 + 1 - 2 - 1) // 1 + 1
        ref = np.array([[xp[n, c, i * 2 + ki, j + kj * 2] for ki in range(3) for kj in range(2) for c in range(C)]
                        for n in range(2) for i in range(Ho) for j in range(Wo)])
        np.testing.assert_array_equal(cols, ref)


# -- the fast paths: chunked GEMMs, many channels, channels-last inputs, tiled max pooling ---------------------------
@pytest.mark.parametrize("case", [dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding=1, stride=2),
                                  dict(kernel_size=(3, 2), padding="same", dilation=(1, 2), bias=False)], ids=str)
def test_conv2d_many_channels_several_chunks_gradcheck(case, monkeypatch):
    """C >= 8 takes the windowed gather, C >= C_out the flipped-kernel dx at stride 1; 2 images per chunk."""
    from ndtrain.engine.conv import im2col as im2col_module
    monkeypatch.setattr(im2col_module, "CHUNK_ROWS", 30)
    rng = np.random.default_rng(8)
    assert_gradcheck(Conv2d(9, 5, **case), [rng.standard_normal((5, 9, 5, 4))])


@pytest.mark.parametrize("rows", [1, 50, 130])  # 1, 2 and 5 images of 25 rows per chunk
def test_chunking_does_not_change_results(rows, monkeypatch):
    from ndtrain.engine.conv import im2col as im2col_module
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 10, 5, 5))
    dy = rng.standard_normal((6, 12, 5, 5))
    outs = []
    for chunk_rows in (10_000, rows):
        monkeypatch.setattr(im2col_module, "CHUNK_ROWS", chunk_rows)
        m = Conv2d(10, 12, 3, padding="same")
        ParamStore.from_module(m, dtype=np.float64, seed=3)
        y, bwd = m(x, train=True)
        outs.append((y, bwd(dy), m.W.grad.copy(), m.b.grad.copy()))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_channels_last_input_and_tiled_maxpool_layouts():
    """Conv outputs are channels-last arrays seen as NCHW; the layers after them accept any layout and agree with
    the same values stored NCHW-contiguous."""
    rng = np.random.default_rng(10)
    x_cl = _distinct(rng, (2, 5, 4, 9)).transpose(0, 3, 1, 2)  # (2, 9, 5, 4), channels-last memory
    x_c = np.ascontiguousarray(x_cl)
    m = Sequential(Conv2d(9, 9, 3, padding="same"), MaxPool2d(2))
    ParamStore.from_module(m, dtype=np.float64, seed=4)
    (y1, b1), (y2, b2) = m(x_cl, train=True), m(x_c, train=True)
    np.testing.assert_array_equal(y1, y2)
    dy = rng.standard_normal(y1.shape)
    np.testing.assert_allclose(b1(dy), b2(dy), rtol=1e-13, atol=1e-13)
    pool_cl, pool_c = MaxPool2d(2)(x_cl, train=True), MaxPool2d(2)(x_c, train=True)
    np.testing.assert_array_equal(pool_cl[0], pool_c[0])
    np.testing.assert_array_equal(pool_cl[1](dy), pool_c[1](dy))


def test_maxpool_ties_and_odd_sizes_equal_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = rng.integers(0, 3, (2, 3, 7, 5)).astype(np.float64)  # many ties in every window; odd sizes drop the edge
    for k in (2, 3, (2, 3)):
        y, bwd = MaxPool2d(k)(x, train=True)
        xt = torch.from_numpy(x).requires_grad_()
        yt = torch.nn.MaxPool2d(k)(xt)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        dy = rng.standard_normal(y.shape)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_array_equal(bwd(dy), xt.grad.numpy())


def test_many_channel_conv_equals_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    for case in (dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding=1, stride=2)):
        m = Conv2d(9, 8, **case)
        ParamStore.from_module(m, dtype=np.float64, seed=5)
        tm = torch.nn.Conv2d(9, 8, **case).double()
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(m.W.data))
            tm.bias.copy_(torch.from_numpy(m.b.data))
        x = rng.standard_normal((3, 9, 6, 5))
        y, bwd = m(x, train=True)
        xt = torch.from_numpy(x).requires_grad_()
        yt = tm(xt)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(bwd(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.W.grad, tm.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.b.grad, tm.bias.grad.numpy(), rtol=1e-12, atol=1e-12)
