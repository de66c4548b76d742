"""cluster.compress in the gradient reducer (cluster/compressed.py): the payloads are exchanged compressed, every
rank ends each step with the same parameters, the error-feedback residuals ride in checkpoints so a resume is
bitwise exact, and the config refuses what it cannot honour."""
import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.comm.gather import allgather_array
from ndtrain.launch.config import ConfigError
from helpers.runs import make_cfg
from helpers.threads import ThreadComm, ThreadGroup, run_threads


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


SETS = ["run.task=\"spirals\"", "run.batch_size=20", "model.hidden=[16, 16]", "cluster.bucket_mb=0.001",
        "optim.name=\"sgd\"", "optim.lr=0.3"]


def _run(out, world, *extra):
    cfgs = [make_cfg(out, *SETS, *extra, workers=world) for _ in range(world)]
    summaries, errs = run_threads(cfgs)
    assert errs == [None] * world, errs
    return summaries


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "powersgd"])
def test_compressed_training_keeps_every_rank_equal_and_differs_from_float32(tmp_path, scheme):
    many = _run(tmp_path / scheme, 2, "run.steps=6", f"cluster.compress=\"{scheme}\"")
    assert len({s["param_checksum"] for s in many}) == 1  # every rank holds the same parameters
    plain = _run(tmp_path / "plain", 2, "run.steps=6")
    assert plain[0]["param_checksum"] != many[0]["param_checksum"]  # compression really ran
    a, b = ckpt.load(tmp_path / scheme / "checkpoints"), ckpt.load(tmp_path / "plain" / "checkpoints")
    for k in a.params:  # ... and stays close to the float32 run (error feedback, few steps)
        np.testing.assert_allclose(a.params[k], b.params[k], atol=0.05)
    assert set(a.ranks) == {"0", "1"} and all(a.ranks[r] for r in a.ranks)  # each rank's residuals saved
    residuals = [k for k in a.ranks["0"] if k.startswith("residual/")]
    assert residuals and any(not np.array_equal(a.ranks["0"][k], a.ranks["1"][k]) for k in residuals)


@pytest.mark.parametrize("scheme", ["fp16", "powersgd"])
def test_resume_with_compression_is_bitwise_exact(tmp_path, scheme):
    flag = f"cluster.compress=\"{scheme}\""
    full = _run(tmp_path / "full", 2, "run.steps=8", flag)
    _run(tmp_path / "part", 2, "run.steps=8", "run.checkpoint_every=4", flag)
    resumed = _run(tmp_path / "resumed", 2, "run.steps=8", flag,
                   f"run.resume=\"{tmp_path / 'part' / 'checkpoints' / 'ckpt-00000004.json'}\"")
    assert resumed[0]["param_checksum"] == resumed[1]["param_checksum"] == full[0]["param_checksum"]


def test_resume_without_the_residuals_differs(tmp_path, monkeypatch):
    """The residuals matter: a resume that drops them ends elsewhere (so the exact resume above needs them)."""
    from ndtrain.cluster.reducer import GradReducer
    flag = "cluster.compress=\"fp16\""
    full = _run(tmp_path / "full", 2, "run.steps=8", flag)
    _run(tmp_path / "part", 2, "run.steps=8", "run.checkpoint_every=4", flag)
    monkeypatch.setattr(GradReducer, "load_state_dict", lambda self, state: None)
    resumed = _run(tmp_path / "resumed", 2, "run.steps=8", flag,
                   f"run.resume=\"{tmp_path / 'part' / 'checkpoints' / 'ckpt-00000004.json'}\"")
    assert resumed[0]["param_checksum"] == resumed[1]["param_checksum"] != full[0]["param_checksum"]


def test_allgather_array_returns_every_rank_bitwise():
    import threading
    g = ThreadGroup(3)
    out = [None] * 3
    vals = [np.array([1, 65535, 7], np.uint16) * 0 + np.uint16(r * 1000 + 1) for r in range(3)]

    def go(r):
        out[r] = allgather_array(ThreadComm(g, r), vals[r])
    ts = [threading.Thread(target=go, args=(r,)) for r in range(3)]
    [t.start() for t in ts]
    [t.join(10) for t in ts]
    for r in range(3):
        assert out[r].dtype == np.uint16 and np.array_equal(out[r], np.stack(vals))


def test_compression_with_deterministic_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cluster.compress"):
        make_cfg(tmp_path, "cluster.compress=\"fp16\"", "run.deterministic=true")
    with pytest.raises(ConfigError, match="cluster.compress"):
        make_cfg(tmp_path, "cluster.compress=\"zip\"")


@pytest.mark.parametrize("scheme", ["fp16", "bf16", "powersgd"])
def test_a_non_finite_gradient_stays_non_finite_on_every_rank(scheme):
    """fp16 saturates +-inf to 65504: without care one rank's overflow would be applied as a finite step. The
    exchange keeps it non-finite, so the loop skips the step on every rank alike; the residuals stay finite."""
    import threading
    from ndtrain.cluster.compressed import CompressedExchange
    from ndtrain.cluster.reducer import make_buckets
    from ndtrain.engine.params import Param, ParamStore

    g = ThreadGroup(2)
    out = [None, None]

    def go(r):
        store = ParamStore([("w", Param((8, 6))), ("b", Param((6,)))], seed=0)
        store.grad[...] = np.arange(store.size, dtype=np.float32) / 10
        if r == 1:
            store.grad[3] = np.inf
        ex = CompressedExchange(ThreadComm(g, r), store, make_buckets(store, 1 << 20), scheme, powersgd_rank=1)
        ex.reduce()
        out[r] = (store.grad.copy(), ex.state_dict())
    ts = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    [t.start() for t in ts]
    [t.join(10) for t in ts]
    for grad, state in out:
        assert not np.isfinite(grad).all()
        assert all(np.isfinite(v).all() for v in state.values())
