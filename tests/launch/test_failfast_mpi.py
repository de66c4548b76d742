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

    def enter_comm(self, nbytes=0):
        self.events.append("enter")
        self.nbytes = nbytes

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
    assert rep.nbytes == buf.nbytes  # what is in flight: the MPI stall limit scales with it
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


# -- stalls judged by progress (issue 19: a slow link is not a hang) -------------------------------------------------
def test_a_slow_but_moving_collective_is_no_stall_and_a_stuck_one_is():
    """Bytes counted as they move (the ring): waiting 30 s with a 5 s stall timeout is fine while the counters
    grow; once they stop, the alarm comes stall_timeout after the last movement."""
    c = _coord(2, stall_timeout=5.0)
    c.training.update({0, 1})
    t0 = time.monotonic()
    for i in range(7):  # 7 heartbeats, 1 s apart (in the coordinator's clock), each with more bytes moved
        for r in range(2):
            c._note_progress(r, {"comm_bytes": 1000 * (i + 1), "comm_counted": True}, t0 + i)
    for r in range(2):
        c.liveness[r] = (t0 + 6, 30.0)  # both blocked in the collective for 30 s already
    c._check_stall(t0 + 6.5)
    assert c.failure is None
    c._check_stall(t0 + 10.9)  # 4.9 s without progress
    assert c.failure is None
    c._check_stall(t0 + 11.5)  # 5.5 s without progress: stuck
    assert c.failure is not None and "every rank" in c.failure.reason


def test_without_progress_counters_the_old_rule_holds():
    """No byte counters in the heartbeat (an older rank): time inside the call, as before."""
    c = _coord(2, stall_timeout=5.0)
    t0 = time.monotonic()
    c.liveness[0], c.liveness[1] = (t0, 6.0), (t0, None)
    c.training.update({0, 1})
    c._check_stall(t0)
    assert c.failure is not None and c.failure.rank == 1


def test_mpi_deadline_scales_with_the_bytes_in_flight_over_the_measured_bandwidth():
    """Bytes counted only when a call returns (MPI): 100 MB in flight on a 1 MB/s link may take 20 + 4 x 100 s."""
    c = _coord(2, stall_timeout=20.0)
    c.training.update({0, 1})
    t0 = time.monotonic()
    for r in range(2):
        c._note_progress(r, {"comm_bytes": 0, "comm_counted": False, "inflight_bytes": 100_000_000,
                             "link_bps": 1e6}, t0)
        c.liveness[r] = (t0, 300.0)  # 300 s in the call: far past 20 s, well within 420 s
    c._check_stall(t0)
    assert c.failure is None
    for r in range(2):
        c.liveness[r] = (t0, 421.0)
    c._check_stall(t0)
    assert c.failure is not None and "stall timeout 420 s" in c.failure.reason


def test_heartbeats_carry_the_bytes_moved_and_in_flight():
    """WatchedComm hands the transport's counters and each blocking call's bytes to the reporter; its liveness
    (what every heartbeat carries) says them."""
    import numpy as np
    from ndtrain.cluster.comm.counters import CommCounters
    from ndtrain.cluster.metrics_channel import RankReporter
    from ndtrain.cluster.rank_entry import WatchedComm

    rep = RankReporter.__new__(RankReporter)  # no coordinator link: only the liveness bookkeeping
    rep.step, rep._step_t0, rep._training = 3, time.monotonic(), True
    rep._comm_depth, rep._comm_t0, rep._comm_s, rep._counters, rep._inflight = 0, 0.0, 0.0, None, 0
    rep.link_bps = 2.5e7
    seen = {}

    class Comm:
        rank, world_size, counters = 0, 2, CommCounters(estimated=True)

        def allreduce(self, buf):
            self.counters.collective(buf.nbytes, buf.nbytes, buf.nbytes, 0.0)
            seen.update(rep.liveness())

    w = WatchedComm(Comm(), rep)
    w.allreduce(np.zeros(1000, np.float32))
    assert seen["inflight_bytes"] == 4000 and seen["comm_counted"] is False and seen["link_bps"] == 2.5e7
    after = rep.liveness()
    assert after["comm_bytes"] == 8000 and after["comm_wait_s"] is None and "inflight_bytes" not in after


def test_a_rank_notice_reaches_the_console_through_the_coordinator():
    """The start-up advice (and a skipped step's notice) comes from rank 0's trainer: on MPI and Ray its sink is
    the reporter, so the line travels to the coordinator and out through the launcher's sinks."""
    from ndtrain.cluster.metrics_channel import RankReporter

    class Sink:
        def __init__(self):
            self.lines = []

        def notice(self, message):
            self.lines.append(message)

    sink = Sink()
    c = Coordinator(1, writer=sink).start()
    rep = RankReporter(c.address, c.token, 0, 1, heartbeat_s=0.05)
    try:
        rep.notice("advice: try --compress fp16")
        deadline = time.monotonic() + 10
        while not sink.lines and time.monotonic() < deadline:
            c.poll(0.05)
        assert sink.lines == ["advice: try --compress fp16"]
    finally:
        rep.close()
        c.close()
