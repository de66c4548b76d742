"""cluster.sync_every (DiLoCo / local SGD, cluster/local_sgd.py): H = 1 with outer lr 1 and momentum 0 is
synchronous training; H > 1 keeps ranks apart between syncs and equal after them; resume is bitwise exact; the
same run twice is bitwise the same; the loss logged is the ranks' local losses, token-weighted."""
import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.rundir import read_metrics
from helpers.runs import make_cfg
from helpers.threads import run_threads


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


SETS = ["run.task=\"spirals\"", "run.batch_size=20", "model.hidden=[16, 16]", "run.dtype=\"float64\""]


def _run(out, world, *extra):
    cfgs = [make_cfg(out, *SETS, *extra, workers=world) for _ in range(world)]
    summaries, errs = run_threads(cfgs)
    assert errs == [None] * world, errs
    return summaries


def test_sync_every_1_with_outer_lr_1_momentum_0_is_synchronous_sgd(tmp_path):
    sgd = ["run.steps=6", "optim.name=\"sgd\"", "optim.lr=0.5"]
    sync = _run(tmp_path / "sync", 2, *sgd)
    local = _run(tmp_path / "local", 2, *sgd, "cluster.sync_every=1", "cluster.outer_lr=1.0",
                 "cluster.outer_momentum=0.0")
    a, b = ckpt.load(tmp_path / "sync" / "checkpoints"), ckpt.load(tmp_path / "local" / "checkpoints")
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=0, atol=1e-12)
    assert local[0]["param_checksum"] == local[1]["param_checksum"]
    la, lb = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "local")
    assert lb[0]["loss"] == pytest.approx(la[0]["loss"], rel=1e-12)  # equal shares: the same mean loss


def test_diloco_ranks_drift_between_syncs_and_agree_after(tmp_path):
    out = _run(tmp_path / "d", 2, "run.steps=8", "cluster.sync_every=3", "run.checkpoint_every=4",
               "optim.name=\"adam\"", "optim.lr=0.01")
    assert out[0]["param_checksum"] == out[1]["param_checksum"]  # the last step always syncs
    mid = ckpt.load(tmp_path / "d" / "checkpoints" / "ckpt-00000004.json")  # step 4: one inner step after a sync
    assert not np.array_equal(mid.ranks["0"]["params"], mid.ranks["1"]["params"])
    assert "loop.anchor" in mid.optim and "loop.momentum" in mid.optim
    # param/ is the anchor (the synchronised model, what eval and generate see), not a rank's local parameters
    flat = np.concatenate([mid.params[n].reshape(-1) for n in mid.params])
    assert np.array_equal(np.sort(flat), np.sort(mid.optim["loop.anchor"]))
    assert not np.array_equal(np.sort(flat), np.sort(mid.ranks["0"]["params"]))
    sync = _run(tmp_path / "s", 2, "run.steps=8", "optim.name=\"adam\"", "optim.lr=0.01")
    assert sync[0]["param_checksum"] != out[0]["param_checksum"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_diloco_resume_is_bitwise_exact_and_reproducible(tmp_path, deterministic):
    flags = ["run.steps=9", "cluster.sync_every=4", "optim.name=\"adam\"", "optim.lr=0.01",
             f"run.deterministic={str(deterministic).lower()}", "run.micro_batches=2"]
    full = _run(tmp_path / "full", 2, *flags)
    again = _run(tmp_path / "again", 2, *flags)
    assert full[0]["param_checksum"] == again[0]["param_checksum"]  # reproducible for a given W
    _run(tmp_path / "part", 2, *flags, "run.checkpoint_every=3")  # step 3 and 6: between syncs
    for step in (3, 6):
        resumed = _run(tmp_path / f"r{step}", 2, *flags,
                       f"run.resume=\"{tmp_path / 'part' / 'checkpoints' / f'ckpt-{step:08d}.json'}\"")
        assert resumed[0]["param_checksum"] == resumed[1]["param_checksum"] == full[0]["param_checksum"]


def test_diloco_resume_on_another_world_size_is_refused(tmp_path):
    flags = ["run.steps=6", "cluster.sync_every=2", "run.checkpoint_every=3"]
    _run(tmp_path / "part", 2, *flags)
    cfgs = [make_cfg(tmp_path / "r", *SETS, *flags, workers=3,
                     **{}) for _ in range(3)]
    for c in cfgs:
        c.run.resume = str(tmp_path / "part" / "checkpoints" / "ckpt-00000003.json")
    _, errs = run_threads(cfgs)
    assert any(e is not None and "world size" in str(e) for e in errs)
