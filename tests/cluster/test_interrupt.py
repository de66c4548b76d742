"""The parts of a clean stop, in process (fast): the signal handlers (first signal: a stop request; second: abort),
the loop's stop at a step boundary with a checkpoint, the ranks' agreement on the stop step (one rank's vote stops
all after the same step, in both reduction modes), the coordinator's stop / ack / interrupted messages, a rank that
loses its coordinator (connection closed, or no heartbeat acks) stopping and then ending its process, and the
fate-sharing of child processes (prctl PDEATHSIG, the Reaper watchdog)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster import interrupt
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.fate_share import Reaper, _reap, _stat, descendants
from ndtrain.cluster.metrics_channel import RankReporter
from ndtrain.launch.worker import run_worker
from ndtrain.launch.rundir import NullSink
from helpers.threads import ThreadComm, ThreadGroup
from helpers.runs import make_cfg

SETS = ["run.task=\"spirals\"", "run.batch_size=16", "model.hidden=[8]", "run.steps=12", "run.checkpoint_every=5"]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def clear_stop():
    interrupt.STOP.clear()
    yield
    interrupt.STOP.clear()


# -- signals ---------------------------------------------------------------------------------------------------------
def test_first_signal_requests_a_stop_second_aborts_and_handlers_come_back(capfd):
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with interrupt.handle_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait(lambda: stop.requested, 5, "the handler")
        assert stop.signum == signal.SIGTERM and interrupt.exit_code() == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises in this (the main) thread before the sleep ends
        assert interrupt.exit_code() == 130  # the aborting signal decides
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
    assert not interrupt.STOP.requested
    assert "SIGTERM: stopping at the next step boundary" in capfd.readouterr().err


def test_reinstall_puts_back_a_replaced_sigterm_handler_only_inside_handle_signals():
    def other(signum, frame):
        pass
    with interrupt.handle_signals():
        signal.signal(signal.SIGTERM, other)  # as ray.init does
        interrupt.reinstall()
        assert signal.getsignal(signal.SIGTERM) is interrupt._handler
    old = signal.signal(signal.SIGTERM, other)
    try:
        interrupt.reinstall()
        assert signal.getsignal(signal.SIGTERM) is other
    finally:
        signal.signal(signal.SIGTERM, old)


# -- the loop --------------------------------------------------------------------------------------------------------
class _StopAt(NullSink):
    """A sink whose progress(step) calls `at_step` once the loop starts step `step`."""

    def __init__(self, step: int, at_step):
        self.step, self.at_step = step, at_step

    def progress(self, step: int) -> None:
        if step == self.step:
            self.at_step()


@pytest.mark.parametrize("mode", [[], ["run.deterministic=true", "run.micro_batches=2"]], ids=["default", "det"])
def test_local_stop_request_ends_the_loop_at_the_boundary_with_a_checkpoint_and_resumes_bitwise(tmp_path, mode):
    cfg = make_cfg(tmp_path / "a", *SETS, *mode)
    with pytest.raises(interrupt.Interrupted) as e:
        run_worker(cfg, LocalCommunicator(), _StopAt(7, lambda: interrupt.STOP.request("test")))
    assert e.value.step == 8  # the request came during step 7 (0-based): the next boundary is 8 steps done
    assert int(ckpt.latest(tmp_path / "a" / "checkpoints").stem.split("-")[1]) == 8
    interrupt.STOP.clear()
    run_worker(make_cfg(tmp_path / "a", *SETS, *mode, f"run.resume={json.dumps(str(tmp_path / 'a'))}"),
               LocalCommunicator(), NullSink())
    run_worker(make_cfg(tmp_path / "b", *SETS, *mode), LocalCommunicator(), NullSink())
    a, b = ckpt.load(tmp_path / "a" / "checkpoints"), ckpt.load(tmp_path / "b" / "checkpoints")
    assert a.step == b.step == 12
    assert all(a.params[k].tobytes() == b.params[k].tobytes() for k in a.params)


@pytest.mark.parametrize("mode", [[], ["run.deterministic=true", "run.micro_batches=2"]], ids=["default", "det"])
def test_one_ranks_vote_stops_every_rank_after_the_same_step(tmp_path, monkeypatch, mode):
    """Only rank 1 asks (from its step 5 on); rank 0 never does. Both stop after step 5 (6 steps done): the vote
    rides in the step's collective."""
    voted = threading.local()
    monkeypatch.setattr(interrupt, "vote", lambda: 1.0 if getattr(voted, "yes", False) else 0.0)
    group = ThreadGroup(2)
    errs = [None, None]

    def rank(r):
        sink = _StopAt(5, lambda: setattr(voted, "yes", True)) if r == 1 else None
        try:
            run_worker(make_cfg(tmp_path, *SETS, *mode, workers=2), ThreadComm(group, r), sink)
        except BaseException as e:
            errs[r] = e
            if not isinstance(e, interrupt.Interrupted):
                group.barrier.abort()
    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert all(isinstance(e, interrupt.Interrupted) for e in errs), errs
    assert [e.step for e in errs] == [6, 6]
    assert int(ckpt.latest(tmp_path / "checkpoints").stem.split("-")[1]) == 6
    assert not (tmp_path / "summary.json").exists()


def test_no_request_no_stop_and_agreed_reads_the_reduced_vote():
    assert interrupt.vote() == 0.0 and not interrupt.agreed(0.0, 1) and not interrupt.agreed(0.0, 2)
    assert interrupt.agreed(1.0, 2) and interrupt.agreed(2.0, 4)
    interrupt.STOP.request("x")
    assert interrupt.vote() == 1.0 and interrupt.agreed(0.0, 1)  # one rank: its own request, read now


# -- coordinator <-> rank --------------------------------------------------------------------------------------------
def test_coordinator_acks_heartbeats_and_tells_every_rank_to_stop_even_late_ones():
    coord = Coordinator(2).start()
    stops = []
    try:
        r0 = RankReporter(coord.address, coord.token, 0, 2, heartbeat_s=0.05, on_stop=lambda: stops.append(0))
        first = r0._last_ack
        _wait(lambda: r0._last_ack > first, 10, "an ack of a heartbeat")
        coord.request_stop()
        _wait(lambda: stops == [0], 10, "rank 0's stop")
        r1 = RankReporter(coord.address, coord.token, 1, 2, on_stop=lambda: stops.append(1))  # after the request
        _wait(lambda: sorted(stops) == [0, 1], 10, "the late rank's stop")
        assert r0.stop_requested and r1.stop_requested and not r0.lost
        for r in (r0, r1):
            r.interrupted(7)
        _wait(lambda: (coord.poll(0.05), coord.finished)[1], 10, "the interrupted job to finish")
        assert coord.failure is None and coord.interrupted_step == 7
    finally:
        coord.close()


def test_ranks_reporting_different_stop_steps_fail_the_job():
    coord = Coordinator(2)
    for r, step in ((0, 7), (1, 8)):
        coord.handle({"type": "hello", "rank": r})
        coord.handle({"type": "interrupted", "rank": r, "step": step})
    assert coord.failure is not None and "different steps" in coord.failure.reason
    assert coord.interrupted_step is None


def test_rank_notices_a_closed_coordinator_and_one_that_stops_acking():
    coord = Coordinator(1).start()
    lost = []
    rep = RankReporter(coord.address, coord.token, 0, 1, heartbeat_s=0.05, on_lost=lost.append)
    coord.close()
    _wait(lambda: lost, 10, "the closed connection")
    assert rep.lost and "closed" in lost[0]
    rep.close()

    coord = Coordinator(1).start()
    coord._server._replies = lambda: None  # a coordinator that keeps the connection open but never answers
    lost = []
    t0 = time.monotonic()
    rep = RankReporter(coord.address, coord.token, 0, 1, heartbeat_s=0.05, on_lost=lost.append, ack_timeout_s=0.5)
    try:
        _wait(lambda: lost, 10, "the missing acks")
        assert "no reply to heartbeats" in lost[0] and time.monotonic() - t0 >= 0.5
    finally:
        rep.close()
        coord.close()


_FAKE_RANK = textwrap.dedent("""
    import sys, time
    from ndtrain.cluster import interrupt
    from ndtrain.cluster.metrics_channel import RankReporter
    addr, token, mode = sys.argv[1:4]
    rep = RankReporter(addr, token, 0, 1, heartbeat_s=0.05,
                       on_lost=lambda reason: interrupt.coordinator_lost(reason, grace_s=1.0))
    print("connected", flush=True)
    if mode == "hung":
        time.sleep(60)  # a loop that never reaches a step boundary: the grace period ends the process
    while not interrupt.requested():  # the loop's step boundaries
        time.sleep(0.01)
    print("stopped:", interrupt.STOP.reason, flush=True)
    interrupt.end_rank_if_lost()
    time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["stops", "hung"])
def test_rank_that_loses_its_coordinator_ends_its_process(tmp_path, mode):
    coord = Coordinator(1).start()
    p = subprocess.Popen([sys.executable, "-c", _FAKE_RANK, coord.address, coord.token, mode],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "connected\n"
        t0 = time.monotonic()
        coord.close()  # the driver died
        out, _ = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
        coord.close()
    assert p.returncode == interrupt.EXIT_LOST
    if mode == "stops":
        assert "stopped: lost the coordinator: it" in out and took < 1.0 + 5  # closed / reset the connection
    else:
        assert "stopped" not in out and 1.0 <= took < 1.0 + 10


# -- fate sharing ----------------------------------------------------------------------------------------------------
_DRIVER = textwrap.dedent("""
    import signal, subprocess, sys, time
    from ndtrain.cluster.fate_share import Reaper, die_with_parent
    mode = sys.argv[1]
    if mode == "pdeathsig":
        child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
    else:
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        reaper = Reaper.start()
        reaper.track_descendants()
    print(child.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["pdeathsig", "reaper"])
def test_child_process_ends_when_the_driver_is_killed(mode):
    p = subprocess.Popen([sys.executable, "-c", _DRIVER, mode], stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        start = _stat(child)[1]
        time.sleep(0.3)  # the reaper has read the list
        p.kill()
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _stat(child) is not None and _stat(child)[1] == start and time.monotonic() < deadline:
            time.sleep(0.02)
        stat = _stat(child)
        assert stat is None or stat[1] != start, f"the child ({mode}) outlived the killed driver by 10 s"
    finally:
        if p.poll() is None:
            p.kill()


def test_reaper_kills_only_what_it_tracks_and_checks_the_start_time():
    a = subprocess.Popen(["sleep", "60"])
    b = subprocess.Popen(["sleep", "60"])
    try:
        start_a, start_b = _stat(a.pid)[1], _stat(b.pid)[1]
        assert (a.pid, start_a) in descendants(os.getpid())
        _reap([f"{a.pid} {start_a}\n", f"{b.pid} {start_b + 1}\n", "garbage\n"])  # b: a reused pid, say
        assert a.wait(timeout=10) == -signal.SIGKILL
        assert b.poll() is None
        r = Reaper.start()
        r.track([(b.pid, start_b)])
        r.close()  # a normal end: what it tracks is killed too
        assert b.wait(timeout=10) == -signal.SIGKILL
    finally:
        for q in (a, b):
            if q.poll() is None:
                q.kill()
                q.wait()
