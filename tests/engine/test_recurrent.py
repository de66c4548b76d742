"""RNN / LSTM / GRU: gradient checks (padded, bidirectional, multi-layer, initial state), padding semantics, and
forward equality with torch.nn.LSTM / GRU / RNN when torch is installed."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.recurrent import GRU, LSTM, RNN

CELLS = [RNN, GRU, LSTM]


def _inputs(rng, B=3, T=5, D=4):
    return rng.standard_normal((B, T, D)), np.array([T, 3, 1])


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_padded_multilayer(cls, bidirectional):
    rng = np.random.default_rng(0)
    x, lengths = _inputs(rng)
    m = cls(4, 3, num_layers=2, bidirectional=bidirectional)
    errs = assert_gradcheck(m, [x, lengths])
    assert "input0" in errs and "layers.1.0.W_hh" in errs


@pytest.mark.parametrize("cls", CELLS)
def test_gradcheck_initial_state_bidirectional(cls):
    rng = np.random.default_rng(1)
    x, lengths = _inputs(rng)
    m = cls(4, 3, bidirectional=True)
    h0 = rng.standard_normal((2, 3, 3))
    inputs = [x, lengths, h0] + ([rng.standard_normal((2, 3, 3))] if cls is LSTM else [])
    errs = assert_gradcheck(m, inputs)
    assert "input2" in errs and ("input3" in errs) == (cls is LSTM)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_rows_equal_unpadded_runs(cls, bidirectional):
    """Final states and outputs of a padded row equal running the row alone, unpadded; padded outputs are zero."""
    rng = np.random.default_rng(2)
    m = cls(4, 3, num_layers=2, bidirectional=bidirectional)
    ParamStore.from_module(m, dtype=np.float64, seed=3)
    x, lengths = _inputs(rng)
    x[1, 3:] = 100.0  # garbage in the padding must not leak
    y, _ = m(x, lengths, train=False)
    for b, n in enumerate(lengths):
        y1, _ = m(x[b:b + 1, :n], None, train=False)
        np.testing.assert_allclose(y[0][b, :n], y1[0][0], rtol=1e-12, atol=1e-12)
        assert np.all(y[0][b, n:] == 0)
        for full, alone in zip(y[1:], y1[1:]):
            np.testing.assert_allclose(full[:, b], alone[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", CELLS)
def test_padded_steps_get_no_gradient(cls):
    rng = np.random.default_rng(4)
    m = cls(4, 3, bidirectional=True)
    ParamStore.from_module(m, dtype=np.float64)
    x, lengths = _inputs(rng)
    y, backward = m(x, lengths, train=True)
    dx = backward(rng.standard_normal(y[0].shape), rng.standard_normal(y[1].shape))
    assert np.all(dx[2, 1:] == 0) and np.all(dx[1, 3:] == 0) and np.abs(dx[1, :3]).min() > 0


def test_shapes_and_state_order():
    m = GRU(4, 6, num_layers=3, bidirectional=True)
    ParamStore.from_module(m)
    (out, h_n), _ = m(np.zeros((2, 7, 4), np.float32), train=False)
    assert out.shape == (2, 7, 12) and h_n.shape == (6, 2, 6) and out.dtype == np.float32
    # last layer: forward final state = output at the last step; backward final state = output at step 0
    np.testing.assert_array_equal(h_n[4], out[:, -1, :6])
    np.testing.assert_array_equal(h_n[5], out[:, 0, 6:])


def test_wrong_width_names_the_layer():
    m = LSTM(4, 3)
    ParamStore.from_module(m)
    with pytest.raises(ValueError, match="input width 5"):
        m(np.zeros((1, 2, 5), np.float32), train=False)


# -- against torch --------------------------------------------------------------------------------------------------
def _copy_to_torch(m, tm, torch):
    """Ours stores W_ih (D, G*H) = torch weight_ih.T, same gate order and two biases."""
    with torch.no_grad():
        for l, dirs in enumerate(m.layers):
            for d, cell in enumerate(dirs):
                sfx = f"l{l}" + ("_reverse" if d == 1 else "")
                getattr(tm, f"weight_ih_{sfx}").copy_(torch.from_numpy(cell.W_ih.data.T.copy()))
                getattr(tm, f"weight_hh_{sfx}").copy_(torch.from_numpy(cell.W_hh.data.T.copy()))
                getattr(tm, f"bias_ih_{sfx}").copy_(torch.from_numpy(cell.b_ih.data.copy()))
                getattr(tm, f"bias_hh_{sfx}").copy_(torch.from_numpy(cell.b_hh.data.copy()))


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_and_grads_equal_torch_with_packed_sequences(name, bidirectional):
    torch = pytest.importorskip("torch")
    cls = {"RNN": RNN, "GRU": GRU, "LSTM": LSTM}[name]
    B, T, D, H, L = 4, 6, 5, 3, 2
    m = cls(D, H, num_layers=L, bidirectional=bidirectional)
    ParamStore.from_module(m, dtype=np.float64, seed=5)
    tm = getattr(torch.nn, name)(D, H, num_layers=L, bidirectional=bidirectional, batch_first=True).double()
    _copy_to_torch(m, tm, torch)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, T, D))
    lengths = np.array([6, 4, 2, 5])
    ys, backward = m(x, lengths, train=True)

    xt = torch.from_numpy(x).requires_grad_()
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=True,
                                                     enforce_sorted=False)
    out_p, state = tm(packed)
    out_t, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=T)
    states_t = state if isinstance(state, tuple) else (state,)
    np.testing.assert_allclose(ys[0], out_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(ys[1:], states_t):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)

    cots = [rng.standard_normal(y.shape) for y in ys]
    dx = backward(*cots)
    loss = (out_t * torch.from_numpy(cots[0])).sum() + sum(
        (s * torch.from_numpy(c)).sum() for s, c in zip(states_t, cots[1:]))
    loss.backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    cell = m.layers[0][0]
    np.testing.assert_allclose(cell.W_hh.grad, tm.weight_hh_l0.grad.numpy().T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cell.b_ih.grad, tm.bias_ih_l0.grad.numpy(), rtol=1e-9, atol=1e-12)
