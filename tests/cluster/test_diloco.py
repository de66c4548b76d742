"""DiLoCo's outer step (cluster/diloco.py): H = 1 with lr 1 and no momentum is synchronous SGD; the Nesterov form is
PyTorch's SGD(nesterov=True); the average of H local steps is what lr 1 / mu 0 gives; resume is bitwise exact."""
import numpy as np
import pytest

from ndtrain.cluster.diloco import DiLoCo


def grads(rng, W, P):
    return [rng.standard_normal(P) for _ in range(W)]


def test_sync_every_1_is_synchronous_sgd():
    rng = np.random.default_rng(0)
    W, P, eta, T = 3, 50, 0.1, 5
    theta0 = rng.standard_normal(P)
    sync = theta0.copy()
    workers = [theta0.copy() for _ in range(W)]
    outers = [DiLoCo(theta0, lr=1.0, momentum=0.0) for _ in range(W)]  # each rank holds its own
    for _ in range(T):
        gs = grads(rng, W, P)
        sync -= eta * (sum(gs) / W)                         # synchronous SGD on the mean gradient
        for w, g in zip(workers, gs):
            w -= eta * g                                    # H = 1 inner SGD step on each worker's own batch
        delta_sum = sum(o.outer_gradient(w) for o, w in zip(outers, workers))  # the all-reduce
        for o, w in zip(outers, workers):
            o.outer_step(w, delta_sum, W)
        for w in workers:
            assert w.tobytes() == workers[0].tobytes()     # every rank the same parameters
    np.testing.assert_allclose(workers[0], sync, rtol=0, atol=1e-12)


def test_lr1_no_momentum_averages_the_workers():
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(20)
    ws = [theta + rng.standard_normal(20) for _ in range(4)]
    d = DiLoCo(theta, lr=1.0, momentum=0.0)
    out = np.empty(20)
    d.outer_step(out, sum(d.outer_gradient(w) for w in ws), 4)
    np.testing.assert_allclose(out, sum(ws) / 4, atol=1e-12)


def test_nesterov_matches_pytorch_sgd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    theta = rng.standard_normal(30)
    d = DiLoCo(theta, lr=0.7, momentum=0.9)
    p = torch.nn.Parameter(torch.tensor(theta.copy()))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    params = theta.copy()
    for _ in range(6):
        delta = rng.standard_normal(30)
        d.outer_step(params, delta * 2, 2)                  # a sum over 2 ranks
        p.grad = torch.tensor(delta)
        opt.step()
        np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_nesterov_formula_without_torch():
    d = DiLoCo(np.zeros(1), lr=0.5, momentum=0.9)
    params = np.zeros(1)
    d.outer_step(params, np.array([1.0]), 1)                # m = 1, step = 1 + 0.9 = 1.9
    assert params[0] == pytest.approx(-0.95)
    d.outer_step(params, np.array([1.0]), 1)                # m = 1.9, step = 1 + 1.71 = 2.71
    assert params[0] == pytest.approx(-0.95 - 0.5 * 2.71)


def test_resume_is_bitwise_exact_and_shapes_are_checked():
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(40).astype(np.float32)
    deltas = [rng.standard_normal(40).astype(np.float32) for _ in range(6)]
    a, pa = DiLoCo(theta), theta.copy()
    for x in deltas:
        a.outer_step(pa, x, 2)
    b, pb = DiLoCo(theta), theta.copy()
    for x in deltas[:3]:
        b.outer_step(pb, x, 2)
    c, pc = DiLoCo(np.zeros(40, np.float32)), pb.copy()
    c.load_state_dict({k: np.array(v) for k, v in b.state_dict().items()})
    for x in deltas[3:]:
        c.outer_step(pc, x, 2)
    assert pc.tobytes() == pa.tobytes()
    with pytest.raises(ValueError, match="expected"):
        c.load_state_dict({"anchor": np.zeros(3), "momentum": np.zeros(3)})
    with pytest.raises(ValueError, match="momentum in"):
        DiLoCo(theta, momentum=1.0)
