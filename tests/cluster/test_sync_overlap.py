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


def test_delayed_rule_tau_steps_after_the_launch_equals_its_numpy_definition():
    """cluster.sync_delay = tau < H: each exchange's outer step lands tau inner steps after its launch; rounds stay H
    steps long. Written out independently over 2 ranks; tau = H is the sync() path (apply, then launch)."""
    rng = np.random.default_rng(1)
    P, W, H, tau, rounds, lr, mu = 5, 2, 4, 1, 12, 1.0, 0.0
    theta0 = rng.standard_normal(P)
    targets = [rng.standard_normal(P) for _ in range(W)]
    outers = [DiLoCo(theta0, lr=lr, momentum=mu) for _ in range(W)]
    rules = [OverlappedDiLoCo(o, theta0) for o in outers]
    xs = [theta0.copy() for _ in range(W)]
    A, bs, ys = theta0.copy(), [theta0.copy() for _ in range(W)], [theta0.copy() for _ in range(W)]
    pending = D = None
    for step in range(1, rounds * H + 1):
        xs = [_inner(x, t) for x, t in zip(xs, targets)]
        ys = [_inner(y, t) for y, t in zip(ys, targets)]
        if step % H == 0:  # launch: d_i = b_i - x_i, b_i <- x_i
            pending = rules[0].launch(xs[0]) + rules[1].launch(xs[1])
            D = sum(b - y for b, y in zip(bs, ys))
            bs = [y.copy() for y in ys]
        elif step % H == tau and step > H:  # apply: A <- A + mean progress; x_i <- A + (x_i - b_i); b_i <- A
            for i in range(W):
                rules[i].apply(xs[i], pending, W)
            A = A - lr * D / W
            ys = [A + (y - b) for y, b in zip(ys, bs)]
            bs = [A.copy() for _ in range(W)]
            assert np.array_equal(outers[0].anchor, outers[1].anchor)
            # right after the outer step the ranks differ only by their own progress since the launch (tau steps)
            mean_target = (targets[0] + targets[1]) / 2
            assert not np.array_equal(xs[0], xs[1])
            assert np.linalg.norm(xs[0] - xs[1]) < np.linalg.norm(targets[0] - targets[1])
        for i in range(W):
            np.testing.assert_allclose(xs[i], ys[i], rtol=0, atol=1e-12)
            np.testing.assert_allclose(outers[i].anchor, A, rtol=0, atol=1e-12)
    # the last launch (step rounds * H) applied with no step between: every rank holds the anchor
    for i in range(W):
        rules[i].finish(xs[i], pending, W)
    A = A - lr * D / W
    assert np.array_equal(xs[0], xs[1]) and np.array_equal(xs[0], outers[0].anchor)
    np.testing.assert_allclose(xs[0], A, rtol=0, atol=1e-12)
    assert np.linalg.norm(xs[0] - mean_target) < 0.05 * np.linalg.norm(theta0 - mean_target)


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


@pytest.mark.parametrize("compress", ["", "fp16"])
def test_sync_delay_applies_tau_steps_after_the_launch_and_resumes_bitwise(tmp_path, compress):
    """cluster.sync_delay=2 with H=4: the ranks end with one set of parameters, the run is deterministic, differs
    from tau = H, and resumes bitwise from a checkpoint with the exchange in flight (step 5: launched at 4, applied
    at 6) and from one after its outer step (step 7)."""
    flags = ["run.steps=11", "cluster.sync_every=4", "cluster.sync_overlap=true", "cluster.sync_delay=2",
             "optim.name=\"adam\"", "optim.lr=0.01", "cluster.bucket_mb=0.001", f"cluster.compress=\"{compress}\""]
    full = _run(tmp_path / "full", 2, *flags)
    assert full[0]["param_checksum"] == full[1]["param_checksum"]
    assert _run(tmp_path / "again", 2, *flags)[0]["param_checksum"] == full[0]["param_checksum"]
    late = _run(tmp_path / "late", 2, *[f for f in flags if "sync_delay" not in f])
    assert late[0]["param_checksum"] != full[0]["param_checksum"]  # tau moves where the correction lands
    part = _run(tmp_path / "part", 2, *flags, "run.checkpoint_every=5")
    assert part[0]["param_checksum"] == full[0]["param_checksum"]
    in_flight = ckpt.load(tmp_path / "part" / "checkpoints" / "ckpt-00000005.json")
    assert in_flight.optim["loop.pending"].size == in_flight.optim["loop.anchor"].size
    _run(tmp_path / "part7", 2, *flags, "run.checkpoint_every=7")
    applied = ckpt.load(tmp_path / "part7" / "checkpoints" / "ckpt-00000007.json")
    assert applied.optim["loop.pending"].size == 0  # step 6 applied the exchange launched at step 4
    _run(tmp_path / "part6", 2, *flags, "run.checkpoint_every=6")
    at_apply = ckpt.load(tmp_path / "part6" / "checkpoints" / "ckpt-00000006.json")
    assert at_apply.optim["loop.pending"].size == 0  # applied at step 6 exactly: tau = 2 steps after its launch
    for where, step in (("part", 5), ("part7", 7)):
        resumed = _run(tmp_path / f"r{step}", 2, *flags,
                       f"run.resume=\"{tmp_path / where / 'checkpoints' / f'ckpt-{step:08d}.json'}\"")
        assert resumed[0]["param_checksum"] == resumed[1]["param_checksum"] == full[0]["param_checksum"]


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
    with pytest.raises(ConfigError, match="sync_delay: needs cluster.sync_overlap"):
        make_cfg(tmp_path, *SETS, "cluster.sync_every=4", "cluster.sync_delay=2", workers=2)
    with pytest.raises(ConfigError, match="sync_delay: at most cluster.sync_every"):
        make_cfg(tmp_path, *SETS, "cluster.sync_every=4", "cluster.sync_overlap=true", "cluster.sync_delay=5",
                 workers=2)
    with pytest.raises(ConfigError, match="powersgd"):
        make_cfg(tmp_path, *SETS, "cluster.sync_every=2", "cluster.compress=\"powersgd\"", workers=2)


def test_two_mpi_ranks_overlapped_fp16_run_completes(tmp_path, mpi_ok):
    out = train(tmp_path / "mpi", "--task", "spirals", "--model", "mlp", "--steps", "10", "--backend", "mpi",
                "--workers", "2", "--sync-every", "3", "--sync-overlap", "--compress", "fp16",
                "--set", "run.log_every=5")
    summary = read_summary(out)
    assert summary["steps"] == 10 and summary["world_size"] == 2
    assert (out / "config.toml").read_text().count("sync_overlap = true") == 1  # recorded in the config


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_peek_is_the_next_anchor_without_changing_state(momentum):
    rng = np.random.default_rng(2)
    theta0, d1, d2 = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6)
    outer = DiLoCo(theta0, lr=0.7, momentum=momentum)
    outer.advance(d1, 2)
    before = outer.state_dict()
    peeked = outer.peek(d2, 2)
    after = outer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing changed
    outer.advance(d2, 2)
    assert np.array_equal(peeked, outer.anchor)
    assert not np.array_equal(peeked, before["anchor"])


def test_evaluating_with_an_exchange_in_flight_changes_no_training_number(tmp_path):
    """Evaluation waits for the sum in flight and evaluates the anchor its outer step will give; the sum is still
    applied at its step, so a run with evaluations between launch and apply ends bitwise as one without."""
    flags = ["run.steps=10", "cluster.sync_every=4", "cluster.sync_overlap=true", "optim.name=\"adam\"",
             "optim.lr=0.01"]
    quiet = _run(tmp_path / "quiet", 2, *flags)
    evals = _run(tmp_path / "evals", 2, *flags, "run.eval_every=3")  # steps 3, 6 (in flight), 9 (in flight)
    assert evals[0]["param_checksum"] == quiet[0]["param_checksum"] == evals[1]["param_checksum"]
    assert evals[0]["eval"] == quiet[0]["eval"]
