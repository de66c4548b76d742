"""The pieces of elastic training, in process (docs/elastic.md): the state transfer from the most advanced rank,
the loader re-sliced for a new W, the elastic coordinator's bookkeeping, the config's bounds."""
import json
import threading
import time

import numpy as np
import pytest

from ndtrain.cluster.deterministic import MicroBatchLoader
from ndtrain.cluster.elastic_rank import GroupBroken, Membership, state_arrays, transfer_state
from ndtrain.cluster.membership import ElasticCoordinator
from ndtrain.data import tasks
from ndtrain.data.dataset import as_dataset
from ndtrain.data.loader import Loader
from ndtrain.launch.config import ConfigError, validate
from ndtrain.launch.job import build_job
from ndtrain.launch.rundir import RunWriter, read_metrics
from ndtrain.launch.training import resolve_config

from helpers.threads import ThreadComm, ThreadGroup


def _cfg(tmp_path, **run):
    return validate(resolve_config(task="spirals", model="mlp", run={"out": str(tmp_path), "batch_size": 32, **run},
                                   overrides=["run.report=false", "run.tensorboard=false"]))


def test_state_goes_from_the_most_advanced_rank_to_all_including_a_joiner(tmp_path):
    cfg = _cfg(tmp_path, workers=3, backend="ray")
    jobs = [build_job(cfg, r, 3) for r in range(3)]
    rng = np.random.default_rng(0)
    for j in jobs:  # three different states: rank 1 is one step ahead (it applied the step in flight)
        j.store.data[...] = rng.standard_normal(j.store.size)
        for k, v in j.optimizer.state.items():
            v[...] = rng.standard_normal(v.shape)
    want_params, want_opt = jobs[1].store.data.copy(), {k: v.copy() for k, v in jobs[1].optimizer.state.items()}
    records = [{"step": 7, "loader": {"epoch": 0, "batches_done": 7}}, {"step": 8, "loader": {"epoch": 0,
               "batches_done": 8}}, {"step": -1, "loader": {"epoch": 0, "batches_done": 0}}]
    group, out = ThreadGroup(3), [None] * 3

    def target(r):
        rec = {**records[r], "skipped_steps": r, "nonfinite_in_row": 0, "wall_time": 1.0, "optim_step": 10 + r,
               "fingerprints": {"config": "x"}}
        out[r] = transfer_state(jobs[r], ThreadComm(group, r), rec)

    ts = [threading.Thread(target=target, args=(r,)) for r in range(3)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    assert all(o is not None and o["root"] == 1 and o["step"] == 8 and o["skipped_steps"] == 1 for o in out)
    for j in jobs:
        assert j.store.data.tobytes() == want_params.tobytes()
        assert all(j.optimizer.state[k].tobytes() == v.tobytes() for k, v in want_opt.items())
        assert j.optimizer.step_count == 11


@pytest.mark.parametrize("make", [
    lambda ds, r, w: Loader(ds, 32, r, w, seed=3),
    lambda ds, r, w: MicroBatchLoader(ds, 32, r, w, 3, 8),
])
def test_a_loader_resliced_for_another_world_serves_the_same_global_rows(make):
    """After k batches on W = 3, loaders for W = 2 at that state serve exactly the rows W = 3 would have."""
    ds = as_dataset(tasks.generate("spirals", None, 0, "train"))
    state = {"epoch": 0, "batches_done": 5}

    def rows(world):
        out = []
        for r in range(world):
            ld = make(ds, r, world)
            ld.load_state_dict(state)
            batch = next(iter(ld))
            parts = batch if isinstance(batch, list) else [batch]
            out.append(np.concatenate([p["x"] for p in parts]))
        return np.concatenate(out)

    assert rows(2).tobytes() == rows(3).tobytes() == rows(1).tobytes()
    assert len(rows(2)) == 32


def test_elastic_coordinator_turns_a_lost_rank_into_a_membership_change(tmp_path):
    c = ElasticCoordinator(3, 4, writer=RunWriter(tmp_path), heartbeat_timeout=1000)
    for r in range(3):
        c.handle({"type": "hello", "rank": r, "host": "h", "pid": 100 + r, "reports": r == 0, "_gen": 0})
    c.handle({"type": "eof", "rank": 0, "_gen": 0})
    c.handle({"type": "eof", "rank": 0, "_gen": 0})  # the Ray actor's death, reported again: one loss
    assert c.failure is None and [m for m, _ in c.take_lost()] == [0]
    c.retire(0)
    c.fail(0, 9, "its Ray actor process died (ActorDiedError)")  # the same loss, seen by the driver after retire
    assert c.failure is None and c.lost == []
    c.regroup([1, 2])
    t0 = time.monotonic()
    c.begin_change("shrink", 0, "h", "killed", 3, t0)
    c.handle({"type": "membership", "phase": "resumed", "step": 10, "rank": 1, "_gen": 0})
    assert c.pending_change is not None  # a shrink is recorded once the next step is done
    c.handle({"type": "membership", "phase": "stepped", "step": 11, "rank": 1, "_gen": 0})
    c.handle({"type": "log", "rank": 1, "record": {"step": 15, "loss": 0.5}, "_gen": 0})  # the new rank 0's records
    c.handle({"type": "error", "rank": 2, "step": 16, "traceback": "Traceback ...\nValueError: x", "_gen": 0})
    assert c.failure is not None and c.failure.rank == 2  # a rank that raised still ends the job
    c.close()
    rows = read_metrics(tmp_path)
    ev = [r for r in rows if r.get("event") == "membership"]
    assert len(ev) == 1 and ev[0]["step"] == 10 and ev[0]["world_size"] == 2 and ev[0]["previous_world_size"] == 3
    assert ev[0]["rank"] == 0 and ev[0]["change"] == "shrink" and ev[0]["recovery_s"] >= 0
    assert [r["step"] for r in rows if "loss" in r] == [15]
    assert c.extra_summary["membership_changes"] == 1


def test_membership_release_reaches_the_waiting_loop():
    m = Membership(joining=True, member=3)
    m.request()
    assert m.vote() == 1.0
    threading.Timer(0.2, m.release, args=("comm", {"below_min": False})).start()
    comm, info = m.wait_group(poll_s=0.05)
    assert comm == "comm" and info == {"below_min": False} and m.vote() == 0.0
    assert m.joining  # until it holds the state (elastic_rank.regroup): a transfer that breaks is tried again


@pytest.mark.parametrize("run, cluster, field", [
    ({"workers": 2, "backend": "ray"}, {"min_workers": 3}, "cluster.min_workers"),
    ({"workers": 4, "backend": "ray"}, {"max_workers": 3}, "cluster.min_workers"),
    ({"workers": 2, "backend": "mpi"}, {"min_workers": 1, "max_workers": 3}, "MPI"),
])
def test_worker_bounds_are_checked(tmp_path, run, cluster, field):
    with pytest.raises(ConfigError, match=field):
        validate(resolve_config(task="spirals", model="mlp", run={"out": str(tmp_path), **run}, cluster=cluster))
    ok = validate(resolve_config(task="spirals", model="mlp", run={"out": str(tmp_path), "workers": 2,
                                                                    "backend": "ray"},
                                 cluster={"min_workers": 1, "max_workers": 3}))
    assert (ok.cluster.min_workers, ok.cluster.max_workers) == (1, 3)
    assert json.dumps(ok.to_dict())  # recorded in config.toml


class _BreaksMidTransfer:
    """A comm whose group breaks in the last broadcast, after the root's values arrived (another rank lost during
    the state transfer)."""
    rank, world_size = 0, 2

    def __init__(self, records, n_arrays):
        self.records, self.calls, self.n = records, 0, n_arrays

    def allgather_obj(self, mine):
        return [mine, *self.records]

    def broadcast(self, arr, root):
        self.calls += 1
        arr[...] = 7.0  # the root's values arrive
        if self.calls == self.n:
            raise GroupBroken("a peer was lost")


def test_a_transfer_that_breaks_leaves_an_older_rank_its_own_state(tmp_path):
    """A rank one step behind the root keeps its own (consistent) state when the group breaks mid-transfer, so the
    next regroup chooses its root from honest records."""
    job = build_job(_cfg(tmp_path, workers=2, backend="ray"), 0, 2)
    job.store.data[...] = 1.0
    before = {k: v.copy() for k, v in state_arrays(job).items()}
    rec = {"step": 7, "loader": {}, "fingerprints": {"config": "x"}}
    comm = _BreaksMidTransfer([{**rec, "step": 8}], len(before))
    with pytest.raises(GroupBroken):
        transfer_state(job, comm, rec)
    assert comm.calls == len(before) and "param" in before
    assert all(v.tobytes() == before[k].tobytes() for k, v in state_arrays(job).items())
