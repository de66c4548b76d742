"""Optimizers over the flat buffers: closed-form steps, torch parity on one flat problem, the decay mask, bitwise
resume from state_dict, the penalties."""
import numpy as np
import pytest

from ndtrain.engine import Module, Param, ParamStore
from ndtrain.engine.layers import Linear
from ndtrain.engine.optim import SGD, Adagrad, Adam, AdamW, RMSprop, l1_penalty, l2_penalty


class Two(Module):
    """A decay=True weight (3, 2) and a decay=False bias (2,): the layout AdamW's mask must respect."""

    def __init__(self):
        super().__init__()
        self.lin = Linear(3, 2)

    def forward(self, x, *, train):
        return self.lin(x, train=train)


def make_store(dtype=np.float64, seed=0):
    return ParamStore.from_module(Two(), dtype=dtype, seed=seed)


def scalar_store(value, decay=True):
    class One(Module):
        def __init__(self):
            super().__init__()
            self.p = Param((1,), decay=decay)

    s = ParamStore.from_module(One(), dtype=np.float64)
    s.data[:] = value
    return s


def run_constant_grad(opt, store, g, steps=3):
    out = []
    for _ in range(steps):
        store.grad[:] = g
        opt.step()
        out.append(float(store.data[0]))
    return out


# -- closed forms over 3 steps with a constant gradient --------------------------------------------------------------
def test_sgd_momentum_and_nesterov_closed_form():
    s = scalar_store(1.0)
    # buf: 1, 1.9, 2.71; p -= 0.1 * buf
    assert run_constant_grad(SGD(s, lr=0.1, momentum=0.9), s, 1.0) == pytest.approx([0.9, 0.71, 0.439])
    s = scalar_store(1.0)
    # nesterov: d = g + 0.9 buf = 1.9, 2.71, 3.439
    assert run_constant_grad(SGD(s, lr=0.1, momentum=0.9, nesterov=True), s, 1.0) == pytest.approx(
        [0.81, 0.539, 0.1951])
    s = scalar_store(1.0)
    # L2 decay 0.5 and dampening 0.5, no nesterov: d = g + 0.5 p; buf = d, then 0.9 buf + 0.5 d
    p, buf, ref = 1.0, None, []
    for t in range(3):
        d = 2.0 + 0.5 * p
        buf = d if t == 0 else 0.9 * buf + 0.5 * d
        p -= 0.1 * buf
        ref.append(p)
    assert run_constant_grad(SGD(s, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.5), s, 2.0) == \
        pytest.approx(ref)


def test_adam_adamw_adagrad_rmsprop_closed_form():
    lr, eps, g = 0.01, 1e-8, -0.5
    s = scalar_store(2.0)
    # bias-corrected m and v are exactly g and g^2: each step moves lr * g / (|g| + eps)
    assert run_constant_grad(Adam(s, lr=lr, eps=eps), s, g) == pytest.approx(
        [2.0 + k * lr * 0.5 / (0.5 + eps) for k in (1, 2, 3)], rel=1e-12)
    s = scalar_store(2.0)
    p, ref = 2.0, []
    for _ in range(3):
        p = p * (1 - lr * 0.1) + lr * 0.5 / (0.5 + eps)
        ref.append(p)
    assert run_constant_grad(AdamW(s, lr=lr, eps=eps, weight_decay=0.1), s, g) == pytest.approx(ref, rel=1e-12)
    s = scalar_store(2.0)
    # Adagrad: sum_t = t g^2
    p, ref = 2.0, []
    for t in (1, 2, 3):
        p -= lr * g / (np.sqrt(t) * 0.5 + 1e-10)
        ref.append(p)
    assert run_constant_grad(Adagrad(s, lr=lr), s, g) == pytest.approx(ref, rel=1e-12)
    s = scalar_store(2.0)
    # RMSprop: sq_t = (1 - alpha^t) g^2
    p, ref = 2.0, []
    for t in (1, 2, 3):
        p -= lr * g / (np.sqrt(1 - 0.99 ** t) * 0.5 + 1e-8)
        ref.append(p)
    assert run_constant_grad(RMSprop(s, lr=lr), s, g) == pytest.approx(ref, rel=1e-12)
    s = scalar_store(2.0)
    # centered: ga_t = (1 - alpha^t) g, avg = sqrt(sq - ga^2); with momentum 0.5: buf = 0.5 buf + g / avg
    p, buf, ref = 2.0, 0.0, []
    for t in (1, 2, 3):
        sq, ga = (1 - 0.9 ** t) * g * g, (1 - 0.9 ** t) * g
        buf = 0.5 * buf + g / (np.sqrt(sq - ga * ga) + 1e-8)
        p -= lr * buf
        ref.append(p)
    assert run_constant_grad(RMSprop(s, lr=lr, alpha=0.9, centered=True, momentum=0.5), s, g) == \
        pytest.approx(ref, rel=1e-10)


def test_lr_override_is_for_one_step():
    s = scalar_store(1.0)
    opt = SGD(s, lr=0.1)
    s.grad[:] = 1.0
    opt.step(lr=0.5)
    opt.step()
    assert s.data[0] == pytest.approx(1.0 - 0.5 - 0.1) and opt.lr == 0.1 and opt.step_count == 2


# -- the decay mask --------------------------------------------------------------------------------------------------
def test_adamw_does_not_decay_no_decay_segments():
    store = make_store()
    mask = store.decay_mask()
    assert mask.sum() == 6 and (~mask).sum() == 2
    before = store.data.copy()
    opt = AdamW(store, lr=0.1, weight_decay=0.5)
    store.grad[:] = 0.0  # zero grads: Adam's part is 0, only decay moves
    opt.step()
    np.testing.assert_array_equal(store.data[~mask], before[~mask])
    np.testing.assert_allclose(store.data[mask], before[mask] * (1 - 0.05), rtol=1e-15)
    store2 = make_store()
    AdamW(store2, lr=0.1, weight_decay=0.5, decay_mask=False).step()
    np.testing.assert_allclose(store2.data, before * 0.95, rtol=1e-15)


@pytest.mark.parametrize("cls", [SGD, Adam, Adagrad, RMSprop])
def test_l2_weight_decay_respects_the_mask(cls):
    store = make_store()
    mask = store.decay_mask()
    before = store.data.copy()
    opt = cls(store, lr=0.1, weight_decay=0.3)
    store.grad[:] = 0.0
    opt.step()
    np.testing.assert_array_equal(store.data[~mask], before[~mask])
    # a pure-decay gradient pushes every decayed element towards zero
    assert np.all((before[mask] - store.data[mask]) * np.sign(before[mask]) > 0)


# -- torch parity on one flat quadratic problem ----------------------------------------------------------------------
def _quadratic(size, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    return a @ a.T / size + np.eye(size) * 0.1, rng.standard_normal(size)


CASES = [
    ("SGD", SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("Adam", Adam, dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", AdamW, dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
    ("RMSprop", RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)),
    ("RMSprop", RMSprop, dict(lr=0.01)),
    ("Adagrad", Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
]


@pytest.mark.parametrize("torch_name,cls,kw", CASES)
def test_matches_torch_on_flat_problem(torch_name, cls, kw):
    torch = pytest.importorskip("torch")
    store = make_store()
    mask = store.decay_mask()
    A, c = _quadratic(store.size)
    flat0 = store.data.copy()
    tW, tb = (torch.nn.Parameter(torch.tensor(flat0[:6])), torch.nn.Parameter(torch.tensor(flat0[6:])))
    tkw = dict(kw)
    if "betas" in tkw:
        tkw["betas"] = tuple(tkw["betas"])
    wd = tkw.pop("weight_decay", 0.0)
    topt = getattr(torch.optim, torch_name)([{"params": [tW], "weight_decay": wd},
                                             {"params": [tb], "weight_decay": 0.0}], foreach=False, **tkw)
    opt = cls(store, **kw)
    assert mask[:6].all() and not mask[6:].any()
    for _ in range(5):
        store.grad[:] = A @ store.data - c
        opt.step()
        tp = torch.cat([tW.detach(), tb.detach()]).numpy()
        g = A @ tp - c
        tW.grad, tb.grad = torch.tensor(g[:6]), torch.tensor(g[6:])
        topt.step()
    np.testing.assert_allclose(store.data, torch.cat([tW.detach(), tb.detach()]).numpy(), rtol=1e-12,
                               atol=1e-14)


# -- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (AdamW, dict(lr=0.01, weight_decay=0.1)),
                                    (RMSprop, dict(lr=0.01, centered=True, momentum=0.9)), (Adagrad, {})])
def test_state_dict_round_trip_resumes_bitwise(cls, kw, tmp_path):
    A, c = _quadratic(8)
    A, c = A.astype(np.float32), c.astype(np.float32)

    def steps(store, opt, n):
        for _ in range(n):
            store.grad[:] = A @ store.data - c
            opt.step()

    store = make_store(np.float32)
    opt = cls(store, **kw)
    steps(store, opt, 3)
    np.savez(tmp_path / "ckpt.npz", params=store.data, **opt.state_dict())
    steps(store, opt, 4)

    ck = np.load(tmp_path / "ckpt.npz", allow_pickle=False)
    store2 = make_store(np.float32, seed=99)
    store2.data[:] = ck["params"]
    opt2 = cls(store2, **kw)
    opt2.load_state_dict({k: ck[k] for k in ck.files if k != "params"})
    assert opt2.step_count == 3
    steps(store2, opt2, 4)
    assert store2.data.tobytes() == store.data.tobytes()
    for k, v in opt.state_dict().items():
        assert v.tobytes() == opt2.state_dict()[k].tobytes()


def test_load_state_dict_errors():
    opt = Adam(make_store())
    with pytest.raises(KeyError, match="expected"):
        opt.load_state_dict({"step": np.array(1)})
    bad = opt.state_dict()
    bad["exp_avg"] = np.zeros(3)
    with pytest.raises(ValueError, match="'exp_avg' has shape"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="field 'betas\\[1\\]'"):
        Adam(make_store(), betas=(0.9, 1.0))


def test_no_allocation_state_is_reused():
    store = make_store()
    opt = Adam(store, weight_decay=0.1)
    ids = [id(a) for a in opt._scratch] + [id(v) for v in opt.state.values()]
    store.grad[:] = 1.0
    opt.step()
    opt.step()
    assert ids == [id(a) for a in opt._scratch] + [id(v) for v in opt.state.values()]
    assert store.data.base is None and store["lin.W"].data.base is store.data  # views intact


# -- penalties -------------------------------------------------------------------------------------------------------
def test_l1_l2_penalties_add_grads_and_return_value():
    store = make_store()
    mask = store.decay_mask()
    p = store.data.copy()
    v2 = l2_penalty(store, 0.2)
    assert v2 == pytest.approx(0.1 * np.sum(p[mask] ** 2))
    np.testing.assert_allclose(store.grad, 0.2 * p * mask)
    store.zero_grad()
    v1 = l1_penalty(store, 0.3, decay_mask=False)
    assert v1 == pytest.approx(0.3 * np.abs(p).sum())
    np.testing.assert_allclose(store.grad, 0.3 * np.sign(p))


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                    (AdamW, dict(lr=0.01, weight_decay=0.1)), (Adam, dict(weight_decay=0.1)),
                                    (RMSprop, dict(centered=True, momentum=0.5, weight_decay=0.1)),
                                    (Adagrad, dict(weight_decay=0.1))])
def test_blocked_step_changes_no_bits(cls, kw, monkeypatch):
    """The step runs block by block; blocks of 3 (ragged: the store has 8 elements) give the same bits."""
    import ndtrain.engine.optim.base as base
    A, c = _quadratic(8)
    results = []
    for block in (base.BLOCK, 3):
        monkeypatch.setattr(base, "BLOCK", block)
        store = make_store(np.float32)
        opt = cls(store, **kw)
        for _ in range(3):
            store.grad[:] = A @ store.data - c
            opt.step()
        results.append(store.data.tobytes())
    assert results[0] == results[1]
