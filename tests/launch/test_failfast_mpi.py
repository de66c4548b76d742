"""MPI fails fast: a rank killed with SIGKILL, or hung (NDTRAIN_TEST_HANG makes rank 1 sleep forever at a step
while its heartbeat thread lives on), ends the job non-zero within seconds with a message naming the rank and its
step; `ndtrain train --resume DIR` then completes the run. Plus the pieces that make it work, without processes:
the coordinator's stall rule (a rank its peers wait for in a collective is hung), WatchedComm's comm-wait marks,
the per-rank step times of the aggregated record."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ndtrain.cluster.aggregate import aggregate, with_rank_timing
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.rank_entry import WatchedComm
from ndtrain.launch.rundir import read_metrics

STEPS = 60


def _train_argv(out, *extra) -> list[str]:
    return [sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp", "--backend", "mpi",
            "--workers", "2", "--threads", "1", "--steps", str(STEPS), "--checkpoint-every", "10",
            "--set", "run.log_every=5", "--out", str(out), "-q", *extra]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    env["NDTRAIN_TEST_STEP_DELAY"] = "0.03"  # ~2 s of training: time to kill a rank mid-run
    env.update(extra)
    return env


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _resume_completes(out):
    r = subprocess.run(_train_argv(out, "--resume", str(out)), env=_env(), capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(rf"^done: {STEPS} steps in .*; eval loss .* accuracy", r.stdout, re.M), r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    records = [rec for rec in read_metrics(out) if "eval" not in rec]
    train = [rec["step"] for rec in records]
    assert train[-1] == STEPS and train == sorted(train)
    assert set(records[-1]["rank_step_s"]) == {"0", "1"} and all(v > 0 for v in records[-1]["rank_step_s"].values())


@pytest.mark.timeout(150)
def test_killed_rank_ends_job_naming_it_then_resume_completes(mpi_ok, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(_train_argv(out), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "ranks.json").exists() and list((out / "checkpoints").glob("ckpt-*.json")), 60,
                  "the first checkpoint")
        pid = json.loads((out / "ranks.json").read_text())[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        err = p.communicate(timeout=60)[1]
        elapsed = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end after rank 1 was killed"
    m = re.search(r"rank 1 failed at step (\d+): its process ended", err)
    assert m, err
    # killed after the checkpoint of step 10; a rank's step reaches the coordinator every 0.1 s (~3 steps here)
    assert 6 <= int(m.group(1)) <= STEPS
    assert "--resume" in err
    _resume_completes(out)


def _hang_run(out, stall_timeout: str):
    env = _env(NDTRAIN_TEST_HANG="1:25", NDTRAIN_STALL_TIMEOUT=stall_timeout)
    t0 = time.monotonic()
    r = subprocess.run(_train_argv(out), env=env, capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


@pytest.mark.timeout(150)
def test_hung_rank_ends_job_naming_it(mpi_ok, tmp_path):
    out = tmp_path / "run"
    r, elapsed = _hang_run(out, "3")
    assert r.returncode != 0
    assert "rank 1 failed at step 25: hung: ranks [0] have waited for it in a collective" in r.stderr, r.stderr
    assert elapsed < 30
    assert "--resume" in r.stderr  # resuming itself: the test above


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_hung_rank_with_default_timeouts_ends_job_within_30s(mpi_ok, tmp_path):
    r, elapsed = _hang_run(tmp_path / "run", "")  # "" -> the default stall timeout (20 s)
    assert r.returncode != 0 and "rank 1 failed at step 25: hung" in r.stderr, r.stderr
    assert elapsed < 35, f"{elapsed:.1f} s from start (start-up ~3 s + steps + the 20 s stall timeout)"


# -- the pieces, in process ----------------------------------------------------------------------------------------
def _coord(world=2, **kw) -> Coordinator:
    c = Coordinator(world, heartbeat_timeout=1000, **kw)
    for r in range(world):  # the training loop's mode: only rank 0 sends records
        c.handle({"type": "hello", "rank": r, "host": "h", "pid": 100 + r, "reports": r == 0})
    return c


def test_stall_names_the_rank_its_peers_wait_for():
    c = _coord(3, stall_timeout=5.0)
    c.handle({"type": "hb", "rank": 0, "step": 7, "training": True, "comm_wait_s": 6.0})
    c.handle({"type": "hb", "rank": 1, "step": 6, "training": True, "comm_wait_s": None})
    c.handle({"type": "hb", "rank": 2, "step": 7, "training": True, "comm_wait_s": 2.0})
    c.poll(0)
    assert c.failure is not None and c.failure.rank == 1 and c.failure.step == 6
    assert "hung" in c.failure.reason and "ranks [0]" in c.failure.reason


def test_no_stall_while_waits_are_short_or_a_rank_left_the_collective():
    c = _coord(2, stall_timeout=5.0)
    c.handle({"type": "hb", "rank": 0, "step": 3, "training": True, "comm_wait_s": 4.0})
    c.handle({"type": "hb", "rank": 1, "step": 3, "training": True, "comm_wait_s": None})
    c.poll(0)
    assert c.failure is None
    c.handle({"type": "step", "rank": 0, "step": 4, "comm_wait_s": None})  # left it: no longer waiting
    c.liveness[0] = (time.monotonic() - 100, None)
    c.poll(0)
    assert c.failure is None


def test_stall_with_every_rank_blocked_names_the_one_furthest_behind():
    c = _coord(2, stall_timeout=5.0)
    c.handle({"type": "hb", "rank": 0, "step": 9, "training": True, "comm_wait_s": 8.0})
    c.handle({"type": "hb", "rank": 1, "step": 8, "training": True, "comm_wait_s": 8.0})
    c.poll(0)
    assert c.failure.rank == 1 and "every rank" in c.failure.reason


def test_set_up_gets_the_start_timeout_not_the_stall_timeout():
    c = _coord(2, stall_timeout=5.0, start_timeout=60.0)
    c.handle({"type": "hb", "rank": 0, "step": 0, "training": False, "comm_wait_s": 30.0})  # waits at start-up
    c.handle({"type": "hb", "rank": 1, "step": 0, "training": False, "comm_wait_s": None})  # still loading data
    c.poll(0)
    assert c.failure is None
    c.handle({"type": "hb", "rank": 0, "step": 0, "training": False, "comm_wait_s": 61.0})
    c.poll(0)
    assert c.failure is not None and c.failure.rank == 1 and "stall timeout 60 s" in c.failure.reason


class _Rec:
    def __init__(self):
        self.events = []

    def enter_comm(self):
        self.events.append("enter")

    def leave_comm(self):
        self.events.append("leave")


class _FakeComm:
    rank, world_size = 0, 2

    def allreduce(self, buf):
        buf *= 2

    def iallreduce(self, buf):
        outer = self

        class H:
            def wait(self):
                outer.allreduce(buf)
        return H()

    def broadcast(self, buf, root=0):
        pass

    def barrier(self):
        raise RuntimeError("peer gone")

    def allgather_obj(self, obj):
        return [obj, obj]

    def abort(self):
        return "aborted"


def test_watched_comm_marks_every_blocking_call_and_forwards_the_rest():
    rep = _Rec()
    comm = WatchedComm(_FakeComm(), rep)
    buf = np.ones(3)
    comm.allreduce(buf)
    h = comm.iallreduce(buf)
    assert rep.events == ["enter", "leave"]  # starting a non-blocking reduce does not block
    h.wait()
    assert np.array_equal(buf, np.full(3, 4.0))
    assert comm.allgather_obj(5) == [5, 5]
    with pytest.raises(RuntimeError):
        comm.barrier()
    assert rep.events == ["enter", "leave"] * 4  # balanced even when the call raises
    assert comm.abort() == "aborted" and (comm.rank, comm.world_size) == (0, 2)


def test_reporter_tells_the_coordinator_its_step_time_and_collective_waits():
    from ndtrain.cluster.metrics_channel import RankReporter
    c = Coordinator(1).start()
    rep = RankReporter(c.address, c.token, 0, 1, heartbeat_s=0.05)
    try:
        for step in range(3):
            rep.progress(step)
            rep.enter_comm()
            time.sleep(0.02)
            assert rep.liveness()["comm_wait_s"] >= 0.02
            rep.leave_comm()
            time.sleep(0.02)
        assert rep.liveness()["comm_wait_s"] is None and rep.liveness()["training"]
        rep.progress(3)
        deadline = time.monotonic() + 5
        while 0 not in c.rank_timing and time.monotonic() < deadline:
            c.poll(0.05)
        t = c.rank_timing[0]
        assert t["step_s"] >= 0.04 and 0.02 <= t["comm_s"] < t["step_s"]
        assert c.last_step[0] >= 1 and 0 in c.training
    finally:
        rep.close()
        c.close()


def test_aggregate_keeps_each_ranks_step_time():
    rec = aggregate({0: {"step": 5, "step_time": 0.2, "comm_time": 0.05},
                     1: {"step": 5, "step_time": 0.3, "comm_time": 0.15}})
    assert rec["rank_step_s"] == {"0": 0.2, "1": 0.3}
    assert rec["step_time"] == 0.3 and rec["comm_share"] == pytest.approx((0.25 + 0.5) / 2)
    # every rank's record of the step: exact per-step times, kept over the coordinator's latest timing messages
    with_rank_timing(rec, {0: {"step_s": 9.0, "comm_s": 1.0}, 1: {"step_s": 9.0, "comm_s": 3.0}}, 2)
    assert rec["rank_step_s"] == {"0": 0.2, "1": 0.3} and rec["comm_share"] == pytest.approx(0.375)
    assert rec["rank_comm_share"] == {"0": pytest.approx(1 / 9), "1": pytest.approx(1 / 3)}


def test_coordinator_adds_rank_step_s_and_comm_share_from_timing_messages():
    c = _coord(2)
    c.handle({"type": "timing", "rank": 1, "step": 4, "step_s": 0.5, "comm_s": 0.1})
    c.handle({"type": "timing", "rank": 0, "step": 4, "step_s": 0.4, "comm_s": 0.2})
    c.handle({"type": "log", "rank": 0, "record": {"step": 5, "loss": 1.0, "step_time": 0.41}})
    rec = c.records[-1]
    assert rec["rank_step_s"] == {"0": 0.4, "1": 0.5}
    assert rec["rank_comm_share"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.2)}
    assert rec["comm_share"] == pytest.approx(0.35)
