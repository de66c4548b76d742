"""Resume on a different number of workers (2 -> 1, 1 -> 2): the same global batches in the same order as the
uninterrupted run, parameters equal to float64 rounding; resuming a run directory continues its metrics.jsonl and
falls back to the previous checkpoint when the newest is corrupt."""
import json
from collections import defaultdict

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch import job as job_builder, worker
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.launch.worker import run_worker
from ndtrain.launch.config import ConfigError
from ndtrain.launch.rundir import read_metrics, train_events
from helpers.threads import run_threads
from helpers.runs import make_cfg

SETS = ["run.task=\"spirals\"", "run.batch_size=20", "run.dtype=\"float64\"", "model.hidden=[16]",
        "optim.schedule=\"cosine\"", "optim.schedule_kwargs.total_steps=14", "run.log_every=1"]
N = 14  # spirals: 1000 rows / 20 = 50 batches per epoch; 14 steps stay in epoch 0 (epochs are tested below too)


@pytest.fixture
def seen(monkeypatch):
    """{run tag: {step index: sorted global row ids}}: every rank's rows of every batch it was handed."""
    log = defaultdict(lambda: defaultdict(list))
    real = job_builder.make_loader

    def spy(dataset, cfg, rank, world):
        loader = real(dataset, cfg, rank, world)
        make = loader.make_batch
        tag = cfg.run.out

        def recording(epoch, k):
            log[tag][(epoch, k)].extend(loader.rank_rows(epoch, k).tolist())
            return make(epoch, k)
        loader.make_batch = recording
        return loader
    monkeypatch.setattr(job_builder, "make_loader", spy)
    return log


def _run(out, world, *sets):
    cfgs = [make_cfg(out, *SETS, *sets, workers=world) for _ in range(world)]
    if world == 1:
        return [run_worker(cfgs[0], LocalCommunicator())]
    summaries, errs = run_threads(cfgs)
    assert errs == [None] * world
    return summaries


def _global_batches(log, *tags):
    """The ordered list of global batches (sorted row ids) over the runs `tags`, in step order."""
    out = []
    for tag in tags:
        out += [sorted(rows) for _, rows in sorted(log[str(tag)].items())]
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_global_order(tmp_path, seen, before, after):
    _run(tmp_path / "full", 1, f"run.steps={N}")
    _run(tmp_path / "a", before, f"run.steps={N // 2}")
    _run(tmp_path / "b", after, f"run.steps={N}", f"run.resume={json.dumps(str(tmp_path / 'a'))}")
    full = _global_batches(seen, tmp_path / "full")
    assert len(full) == N and all(len(b) == 20 for b in full)
    assert _global_batches(seen, tmp_path / "a", tmp_path / "b") == full
    a, b = ckpt.load(tmp_path / "full" / "checkpoints"), ckpt.load(tmp_path / "b" / "checkpoints")
    assert b.step == N and b.meta["loader"] == a.meta["loader"] and b.meta["world_size"] == after
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.optim["exp_avg_sq"], a.optim["exp_avg_sq"], rtol=1e-10, atol=1e-20)


def test_resume_across_an_epoch_boundary_on_another_world_size(tmp_path, seen):
    """batch 100: 10 batches per epoch; stop at 7 on 2 ranks, resume on 1 through epochs 0..2."""
    sets = ["run.batch_size=100", "run.steps=25"]
    _run(tmp_path / "full", 1, *sets)
    _run(tmp_path / "a", 2, "run.batch_size=100", "run.steps=7")
    _run(tmp_path / "a", 1, *sets, f"run.resume={json.dumps(str(tmp_path / 'a'))}")
    full = _global_batches(seen, tmp_path / "full")
    assert _global_batches(seen, tmp_path / "a") == full and len(full) == 25
    assert ckpt.load(tmp_path / "a" / "checkpoints").meta["loader"] == {"epoch": 2, "batches_done": 5}


def test_resuming_a_run_directory_continues_its_metrics(tmp_path):
    """A crash after step 9 (checkpoints every 3): resume the run directory; metrics.jsonl ends with steps 1..12
    once each (the replayed steps 7..9 are not duplicated)."""
    out = tmp_path / "run"
    _run(out, 1, "run.steps=9", "run.checkpoint_every=3", "run.keep_checkpoints=5")
    (out / "checkpoints" / "ckpt-00000009.json").unlink()  # as if the crash came before the last checkpoint
    _run(out, 2, "run.steps=12", f"run.resume={json.dumps(str(out))}")
    steps = [r["step"] for r in train_events(read_metrics(out))]
    assert steps == list(range(1, 13))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    _run(out, 1, "run.steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=3")
    npz = out / "checkpoints" / "ckpt-00000006.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # truncated
    with pytest.warns(ckpt.CheckpointWarning, match="ckpt-00000006.npz"), \
            pytest.warns(ckpt.CheckpointWarning, match="resuming from .*ckpt-00000004.json"):
        c = ckpt.load_valid(out / "checkpoints")
    assert c.step == 4
    with pytest.warns(ckpt.CheckpointWarning):
        s = _run(out, 1, "run.steps=8", f"run.resume={json.dumps(str(out))}")[0]
    assert s["steps"] == 8
    # an explicitly named corrupt checkpoint is an error, not a silent substitution
    with pytest.raises(ConfigError, match="run.resume: .*ckpt-00000006.npz"):
        _run(out, 1, "run.steps=8", f"run.resume={json.dumps(str(npz.with_suffix('.json')))}")


def test_resume_refuses_other_data(tmp_path):
    _run(tmp_path / "a", 1, "run.steps=2")
    with pytest.raises(ConfigError, match="run.resume: .*written for data"):
        _run(tmp_path / "b", 1, "run.steps=4", "data.rows=500", f"run.resume={json.dumps(str(tmp_path / 'a'))}")
