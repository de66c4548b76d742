"""The training loop against the Communicator: one step by hand, W ranks == one rank (threads standing in for
processes), exact eval over all rows, start-up checks and errors that name rank and step."""

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.nonfinite import WorkerError
from ndtrain.cluster.trainer import Trainer
from ndtrain.launch.job import build_job
from ndtrain.launch.task_data import load_task_data
from ndtrain.launch.worker import run_worker
from helpers.runs import make_cfg
from helpers.threads import run_threads
from ndtrain.data import tasks
from ndtrain.data.dataset import as_dataset
from ndtrain.data.loader import Loader
from ndtrain.engine.params import ParamStore
from ndtrain.launch.models import build_model
from ndtrain.launch.rundir import NullSink, read_metrics


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    """report.html and TensorBoard cost seconds per run; tests/launch/test_trainer_polish.py covers them."""
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


def test_one_step_is_sgd_on_the_global_mean_loss(tmp_path):
    cfg = make_cfg(tmp_path, "run.task=\"spirals\"", "run.steps=1", "run.batch_size=16", "optim.name=\"sgd\"",
                   "optim.lr=0.5", "run.dtype=\"float64\"", "model.hidden=[8]")
    # by hand: the same init, the loader's first global batch, the gradient of the mean loss, p -= lr g
    train = as_dataset(tasks.generate("spirals", None, 0, "train"))
    tm = build_model("mlp", train.info, cfg)
    store = ParamStore.from_module(tm.module, dtype=np.float64, seed=0)
    before = store.data.copy()
    batch = next(iter(Loader(train, 16, 0, 1, 0)))
    loss_sum, count, backward = tm.loss(batch, train=True)
    backward(1.0 / count)
    expected = before - 0.5 * store.grad

    run_worker(cfg, LocalCommunicator())
    got = ckpt.load(tmp_path / "checkpoints")
    ckpt.restore(got, store)
    np.testing.assert_allclose(store.data, expected, rtol=0, atol=1e-15)
    assert read_metrics(tmp_path)[0]["loss"] == pytest.approx(loss_sum / count, rel=1e-15)


@pytest.mark.parametrize("world", [2, 3])
def test_w_ranks_equal_one_rank(tmp_path, world):
    """Same global batch, seed and steps: W thread-ranks (GradReducer buckets, global count, eval shares) end
    with the parameters and eval metrics of one rank, to float64 rounding. 3 ranks: a global batch of 20 splits
    7/7/6 and the 250 val rows unevenly."""
    sets = ["run.task=\"spirals\"", "run.steps=15", "run.batch_size=20", "run.dtype=\"float64\"",
            "model.hidden=[16, 16]", "optim.grad_clip=0.5", "cluster.bucket_mb=0.001", "run.eval_every=5"]
    one = run_worker(make_cfg(tmp_path / "one", *sets), LocalCommunicator())
    cfgs = [make_cfg(tmp_path / "many", *sets, workers=world) for _ in range(world)]
    many, errs = run_threads(cfgs)
    assert errs == [None] * world
    a, b = ckpt.load(tmp_path / "one" / "checkpoints"), ckpt.load(tmp_path / "many" / "checkpoints")
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-10, atol=1e-13)
    assert len({s["param_checksum"] for s in many}) == 1  # every rank holds the same parameters
    for k, v in one["eval"].items():
        assert many[0]["eval"][k] == pytest.approx(v, rel=1e-10)


def test_eval_covers_every_validation_row_once(tmp_path):
    cfg = make_cfg(tmp_path, "run.task=\"digits\"", "run.eval_batch_size=7")
    data = load_task_data(cfg)
    tr = Trainer(build_job(cfg, 0, 1, data), LocalCommunicator(), NullSink())
    seen = []
    orig = tr.model.metric_sums
    tr.model.metric_sums = lambda batch: (seen.append(len(batch["y"])), orig(batch))[1]
    m = tr.evaluate()
    val = data[2]
    n = val.n_rows()
    assert sum(seen) == n > 300 and len(seen) == -(-n // 7)
    whole = val.batch(np.arange(n))
    x, y = whole["x"], whole["y"]
    assert m["accuracy"] == pytest.approx(np.mean(tr.model.predict(x) == y))


def test_ranks_with_different_configs_are_named(tmp_path):
    c0 = make_cfg(tmp_path, "run.steps=2", workers=2)
    c1 = make_cfg(tmp_path, "run.steps=2", "optim.lr=0.5", workers=2)
    _, errs = run_threads([c0, c1])
    assert isinstance(errs[0], WorkerError) and "rank 1: config" in str(errs[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_names_the_step_and_is_recorded(tmp_path):
    cfg = make_cfg(tmp_path, "run.task=\"sine\"", "run.steps=50", "optim.name=\"sgd\"", "optim.lr=1e6",
                   "model.hidden=[32]")
    # diverged: every step is then non-finite; skipped (no update) until run.max_nonfinite (5) in a row
    with pytest.raises(WorkerError, match=r"rank 0, step \d+: 5 non-finite steps in a row .*layer '\d+'"):
        run_worker(cfg, LocalCommunicator())
    last = read_metrics(tmp_path)[-1]
    assert "error" in last and last["rank"] == 0 and "WorkerError" in last["error"] and last["traceback"]


def test_blas_threads_are_pinned(tmp_path, monkeypatch):
    import threadpoolctl
    seen = []
    real = threadpoolctl.threadpool_limits

    def spy(limits=None, user_api=None):
        seen.append((limits, user_api))
        return real(limits=limits, user_api=user_api)
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", spy)
    run_worker(make_cfg(tmp_path, "run.steps=1", "run.threads=1"), LocalCommunicator())
    assert seen == [(1, "blas")]
