"""Non-finite loss or gradients: the step is skipped on every rank (no parameter or optimizer update, counted in
summary.json), and after run.max_nonfinite in a row the run stops naming the first layer that made the NaN.
NaN is injected through the data: a poisoned row of the training set lands in one known global batch."""
import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch import job as job_builder, worker
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.nonfinite import WorkerError
from ndtrain.launch.worker import run_worker
from ndtrain.data import tasks
from ndtrain.data.dataset import as_dataset
from ndtrain.data.loader import Loader
from ndtrain.launch.rundir import NullSink, read_metrics, read_summary
from helpers.threads import run_threads
from helpers.runs import make_cfg

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

B, SEED = 16, 0
SETS = ["run.task=\"spirals\"", f"run.batch_size={B}", "model.hidden=[8]", "run.log_every=1", "run.dtype=\"float64\""]


def _poison(monkeypatch, batches, position=-1, value=np.nan):
    """Make load_task_data return spirals with x = value in row `position` of each listed global batch (epoch 0).
    position -1: the last row of the batch, i.e. in the share of the LAST rank."""
    info, cols = tasks.generate("spirals", None, SEED, "train")
    cols = {k: v.copy() for k, v in cols.items()}
    order = Loader(as_dataset((info, cols)), B, 0, 1, SEED)
    for k in batches:
        cols["x"][order.global_batch_rows(0, k)[position], 0] = value
    train = as_dataset((info, cols))
    val = as_dataset(tasks.generate("spirals", None, SEED, "val"))
    monkeypatch.setattr(worker, "load_task_data", lambda cfg: (info, train, val))


def test_one_poisoned_batch_is_skipped_without_any_update(tmp_path, monkeypatch):
    """3 steps with batch 2 poisoned end exactly where 2 clean steps end (params AND Adam moments / step count),
    and summary.json counts the skip."""
    clean = make_cfg(tmp_path / "clean", *SETS, "run.steps=2")
    run_worker(clean, LocalCommunicator())
    _poison(monkeypatch, [2])
    run_worker(make_cfg(tmp_path / "nan", *SETS, "run.steps=3"), LocalCommunicator())
    a, b = ckpt.load(tmp_path / "clean" / "checkpoints"), ckpt.load(tmp_path / "nan" / "checkpoints")
    assert all(a.params[k].tobytes() == b.params[k].tobytes() for k in a.params)
    assert a.optim["exp_avg_sq"].tobytes() == b.optim["exp_avg_sq"].tobytes() and a.optim["step"] == b.optim["step"]
    s = read_summary(tmp_path / "nan")
    assert s["skipped_steps"] == 1 and s["steps"] == 3 and b.meta["skipped_steps"] == 1
    assert read_metrics(tmp_path / "nan")[2]["skipped_steps"] == 1


def test_two_ranks_agree_to_skip_when_only_one_sees_the_nan(tmp_path, monkeypatch):
    """The poisoned row is in rank 1's share only; both ranks skip (no hang, no divergence) and end like 1 rank."""
    _poison(monkeypatch, [1, 3])
    one = run_worker(make_cfg(tmp_path / "one", *SETS, "run.steps=5"), LocalCommunicator())
    many, errs = run_threads([make_cfg(tmp_path / "two", *SETS, "run.steps=5", workers=2) for _ in range(2)])
    assert errs == [None, None]
    assert one["skipped_steps"] == many[0]["skipped_steps"] == many[1]["skipped_steps"] == 2
    assert many[0]["param_checksum"] == many[1]["param_checksum"]
    a, b = ckpt.load(tmp_path / "one" / "checkpoints"), ckpt.load(tmp_path / "two" / "checkpoints")
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-12, atol=1e-14)


def test_inf_gradient_with_finite_loss_is_skipped(tmp_path, monkeypatch):
    """A huge input: finite loss is possible only if the layers stay finite; here x=1e300 overflows in float64
    products, so either the loss or the gradient is non-finite — the step is skipped either way."""
    _poison(monkeypatch, [0], value=1e300)
    s = run_worker(make_cfg(tmp_path, *SETS, "run.steps=2"), LocalCommunicator())
    assert s["skipped_steps"] == 1


def _run_threads_without_abort(cfgs):
    """Like helpers.threads.run_threads, but a failing rank does not break the others' barrier: each must stop on its
    own (a rank left waiting would hit the barrier's 60 s timeout instead and show up as BrokenBarrierError)."""
    import threading
    from helpers.threads import ThreadComm, ThreadGroup
    group = ThreadGroup(len(cfgs))
    errs = [None] * len(cfgs)

    def target(r):
        try:
            run_worker(cfgs[r], ThreadComm(group, r), None if r == 0 else NullSink())
        except BaseException as e:  # asserted on by the test
            errs[r] = e

    ts = [threading.Thread(target=target, args=(r,)) for r in range(len(cfgs))]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    return None, errs


@pytest.mark.parametrize("workers", [1, 2])
def test_stops_after_max_nonfinite_in_a_row_naming_the_first_layer(tmp_path, monkeypatch, workers):
    """Batches 1, 2, 3 poisoned, max_nonfinite=3: the run stops at step 3 on every rank, naming layer '0' (the first
    Linear: a NaN input shows in its output) and the rank whose share held the NaN."""
    _poison(monkeypatch, [1, 2, 3])
    cfgs = [make_cfg(tmp_path, *SETS, "run.steps=10", "run.max_nonfinite=3", workers=workers)
            for _ in range(workers)]
    if workers == 1:
        with pytest.raises(WorkerError) as info:
            run_worker(cfgs[0], LocalCommunicator())
        errs = [info.value]
    else:
        _, errs = _run_threads_without_abort(cfgs)
    for e in errs:  # every rank stops by itself with the same report (none left waiting in a collective)
        assert isinstance(e, WorkerError)
        msg = str(e)
        assert "step 3: 3 non-finite steps in a row" in msg and "run.max_nonfinite=3" in msg
        assert f"rank {workers - 1}: non-finite values in the forward output of layer '0' (Linear)" in msg
    last = read_metrics(tmp_path)[-1]
    assert "non-finite steps in a row" in last["error"]


def test_non_finite_streak_resets_after_a_good_step(tmp_path, monkeypatch):
    _poison(monkeypatch, [0, 1, 3, 4])
    s = run_worker(make_cfg(tmp_path, *SETS, "run.steps=6", "run.max_nonfinite=3"), LocalCommunicator())
    assert s["skipped_steps"] == 4


def test_deterministic_mode_skips_too(tmp_path, monkeypatch):
    _poison(monkeypatch, [1])
    det = ["run.deterministic=true", "run.micro_batches=4"]
    one = run_worker(make_cfg(tmp_path / "one", *SETS, *det, "run.steps=3"), LocalCommunicator())
    many, errs = run_threads([make_cfg(tmp_path / "two", *SETS, *det, "run.steps=3", workers=2) for _ in range(2)])
    assert errs == [None, None] and one["skipped_steps"] == many[0]["skipped_steps"] == 1
    assert one["param_checksum"] == many[0]["param_checksum"] == many[1]["param_checksum"]
