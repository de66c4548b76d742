"""cluster.sync_overlap (cluster/diloco.py OverlappedDiLoCo, cluster/local_sgd.py): DiLoCo's outer exchange runs
while the next H inner steps do, and the outer step is applied one round late, each rank keeping its progress since
the launch. The rule equals an independent NumPy definition over 2 simulated ranks; the anchor is bitwise equal on
every rank after each applied step; the run's end leaves one set of parameters; resume is bitwise; the outer
gradient may go as fp16 / bf16 (2-byte payloads all-gathered, error feedback), with the same guarantees."""
import numpy as np
import pytest

from helpers.runs import make_cfg, train
from helpers.threads import run_threads
from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.diloco import DiLoCo, OverlappedDiLoCo
from ndtrain.launch.rundir import read_summary


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


def _inner(x, target, lr=0.3):
    """One inner SGD step on 0.5 |x - target|^2 (each rank its own target: its own data)."""
    return x - lr * (x - target)


def test_overlapped_rule_equals_its_numpy_definition_over_two_ranks():
    rng = np.random.default_rng(0)
    P, W, H, rounds, lr, mu = 7, 2, 3, 20, 0.7, 0.9
    theta0 = rng.standard_normal(P)
    targets = [rng.standard_normal(P) for _ in range(W)]
    # the code under test: one DiLoCo state per rank (as every process holds its own), the exchange a plain sum
    outers = [DiLoCo(theta0, lr=lr, momentum=mu) for _ in range(W)]
    rules = [OverlappedDiLoCo(o, theta0) for o in outers]
    xs = [theta0.copy() for _ in range(W)]
    pending = None
    # the definition, written out: A anchor, m momentum, b_i base, in-flight sum D
    A, m, bs, ys, D = theta0.copy(), np.zeros(P), [theta0.copy() for _ in range(W)], [theta0.copy() for _ in range(W)], None
    for k in range(rounds):
        for _ in range(H):
            xs = [_inner(x, t) for x, t in zip(xs, targets)]
            ys = [_inner(y, t) for y, t in zip(ys, targets)]
        ds = [rules[i].sync(xs[i], pending, W) for i in range(W)]
        pending = ds[0] + ds[1]
        # definition: d_i = b_i - y_i; if D: m = mu m + D/W, A -= lr (D/W + mu m), y_i = A + (y_i - b_i); b_i = y_i
        dd = [b - y for b, y in zip(bs, ys)]
        if D is not None:
            m = mu * m + D / W
            A = A - lr * (D / W + mu * m)
            ys = [A + (y - b) for y, b in zip(ys, bs)]
        bs = [y.copy() for y in ys]
        D = dd[0] + dd[1]
        for i in range(W):
            np.testing.assert_allclose(xs[i], ys[i], rtol=0, atol=1e-12)
            np.testing.assert_allclose(outers[i].anchor, A, rtol=0, atol=1e-12)
        assert np.array_equal(outers[0].anchor, outers[1].anchor)  # the correction is the same on every rank
        if k >= 1:
            assert not np.array_equal(xs[0], xs[1])  # each rank keeps its own progress since the launch
    for i in range(W):
        rules[i].finish(xs[i], pending, W)
    m = mu * m + D / W
    A = A - lr * (D / W + mu * m)
    assert np.array_equal(xs[0], xs[1]) and np.array_equal(xs[0], outers[0].anchor)
    np.testing.assert_allclose(xs[0], A, rtol=0, atol=1e-12)
    # the delayed rule still trains: the anchor ends nearer the mean target than it started
    mid = (targets[0] + targets[1]) / 2
    assert np.linalg.norm(xs[0] - mid) < 0.5 * np.linalg.norm(theta0 - mid)


SETS = ["run.task=\"spirals\"", "run.batch_size=20", "model.hidden=[16, 16]"]


def _run(out, world, *extra):
    cfgs = [make_cfg(out, *SETS, *extra, workers=world) for _ in range(world)]
    summaries, errs = run_threads(cfgs)
    assert errs == [None] * world, errs
    return summaries


@pytest.mark.parametrize("compress", ["", "fp16", "bf16"])
def test_overlapped_and_compressed_sync_end_equal_and_resume_bitwise(tmp_path, compress):
    flags = ["run.steps=9", "cluster.sync_every=2", "cluster.sync_overlap=true", "optim.name=\"adam\"",
             "optim.lr=0.01", "cluster.bucket_mb=0.001", f"cluster.compress=\"{compress}\""]
    full = _run(tmp_path / "full", 2, *flags)
    assert full[0]["param_checksum"] == full[1]["param_checksum"]  # the run's end applies the last outer step
    again = _run(tmp_path / "again", 2, *flags)
    assert again[0]["param_checksum"] == full[0]["param_checksum"]  # deterministic for a given W
    part = _run(tmp_path / "part", 2, *flags, "run.checkpoint_every=3")  # 3 between syncs, 6 right after one
    assert part[0]["param_checksum"] == full[0]["param_checksum"]  # waiting at a checkpoint changes nothing
    mid = ckpt.load(tmp_path / "part" / "checkpoints" / "ckpt-00000003.json")
    assert mid.optim["loop.pending"].size == mid.optim["loop.anchor"].size  # the sum in flight, saved
    assert not np.array_equal(mid.ranks["0"]["params"], mid.ranks["1"]["params"])
    if compress:
        assert any(k.startswith("ef/") for k in mid.ranks["0"])  # each rank's residuals
    for step in (3, 6):
        resumed = _run(tmp_path / f"r{step}", 2, *flags,
                       f"run.resume=\"{tmp_path / 'part' / 'checkpoints' / f'ckpt-{step:08d}.json'}\"")
        assert resumed[0]["param_checksum"] == resumed[1]["param_checksum"] == full[0]["param_checksum"]
    plain = _run(tmp_path / "plain", 2, *[f for f in flags if "sync_overlap" not in f and "compress" not in f])
    assert plain[0]["param_checksum"] != full[0]["param_checksum"]


def test_compressed_outer_gradient_without_overlap_stays_near_float(tmp_path):
    flags = ["run.steps=8", "cluster.sync_every=2", "optim.name=\"adam\"", "optim.lr=0.01"]
    exact = _run(tmp_path / "f32", 2, *flags)
    half = _run(tmp_path / "f16", 2, *flags, "cluster.compress=\"fp16\"")
    assert half[0]["param_checksum"] == half[1]["param_checksum"]
    assert half[0]["param_checksum"] != exact[0]["param_checksum"]
    a, b = ckpt.load(tmp_path / "f32" / "checkpoints"), ckpt.load(tmp_path / "f16" / "checkpoints")
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=0, atol=0.05)
    assert abs(half[0]["eval"]["loss"] - exact[0]["eval"]["loss"]) < 0.05


def test_config_refuses_overlap_without_sync_every_and_powersgd_with_it(tmp_path):
    from ndtrain.launch.config import ConfigError
    with pytest.raises(ConfigError, match="sync_overlap"):
        make_cfg(tmp_path, *SETS, "cluster.sync_overlap=true", workers=2)
    with pytest.raises(ConfigError, match="powersgd"):
        make_cfg(tmp_path, *SETS, "cluster.sync_every=2", "cluster.compress=\"powersgd\"", workers=2)


def test_two_mpi_ranks_overlapped_fp16_run_completes(tmp_path, mpi_ok):
    out = train(tmp_path / "mpi", "--task", "spirals", "--model", "mlp", "--steps", "10", "--backend", "mpi",
                "--workers", "2", "--sync-every", "3", "--sync-overlap", "--compress", "fp16",
                "--set", "run.log_every=5")
    summary = read_summary(out)
    assert summary["steps"] == 10 and summary["world_size"] == 2
    assert (out / "config.toml").read_text().count("sync_overlap = true") == 1  # recorded in the config
