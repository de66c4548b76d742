"""Ray recovers from a dead worker: kill -9 one rank's process mid-run and the launcher notices within 10 s, tears
the group down, starts a new one from the last checkpoint, and the run finishes with `restarts` == 1 in
summary.json, the right step count, and metrics.jsonl continued without repeated steps. Plus, in process: the
coordinator's generations (a dead group's messages are ignored, replayed steps are not written twice), the
recovery settings, the `done:` line."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.coordinator import Coordinator, Failure
from ndtrain.launch.recovery import recovery_settings
from ndtrain.launch.launch_ray import _recoverable
from ndtrain.launch.progress import format_done
from ndtrain.launch.rundir import RunWriter, read_metrics

from helpers.procs import Lines

STEPS = 120


@pytest.mark.timeout(180)
def test_killed_worker_is_restarted_from_checkpoint_and_run_completes(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    env.update(NDTRAIN_TEST_STEP_DELAY="0.1", NDTRAIN_MAX_RESTARTS="2", RAY_IGNORE_UNHANDLED_ERRORS="1")
    argv = [sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp", "--backend", "ray",
            "--workers", "2", "--threads", "1", "--steps", str(STEPS), "--checkpoint-every", "10",
            "--set", "run.log_every=5", "--out", str(out), "-q"]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(p.stderr)
    try:
        deadline = time.monotonic() + 90
        while not ((out / "ranks.json").exists() and ckpt.latest(out / "checkpoints") is not None):
            assert time.monotonic() < deadline and p.poll() is None, err.text(join=False)
            time.sleep(0.05)
        first_pids = {r["rank"]: r["pid"] for r in json.loads((out / "ranks.json").read_text())}
        killed_after = ckpt.load(out / "checkpoints").step
        # The kill must land mid-run for the test to mean anything (a 12 s run at 0.1 s per step gives a wide window
        # even on a loaded machine).
        assert killed_after < STEPS // 2, f"the kill came too late (checkpoint at step {killed_after})"
        os.kill(first_pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        # Not p.communicate(): it would also read stderr, racing the Lines thread for the lines checked below.
        p.wait(timeout=120)
        stdout = p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
    text = err.text()
    assert p.returncode == 0, text[-3000:]
    noticed = err.first(r"rank 1 failed at step \d+")
    assert noticed is not None, text[-3000:]
    assert noticed[0] - t_kill < 10, f"noticed {noticed[0] - t_kill:.1f} s after the kill"
    assert err.first(r"restarting the rank group \(1 of at most 2\) from .*checkpoints") is not None, text[-3000:]
    assert re.search(rf"^done: {STEPS} steps in .*\(1 restart\); final loss .*; eval loss", stdout, re.M), stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == STEPS
    assert ckpt.load(out / "checkpoints").step == STEPS
    train = [r["step"] for r in read_metrics(out) if "eval" not in r]
    assert train == list(range(5, STEPS + 1, 5))  # one file, every logged step once, in order
    new_pids = {r["rank"]: r["pid"] for r in json.loads((out / "ranks.json").read_text())}
    assert not set(new_pids.values()) & set(first_pids.values())  # a new group of processes


# -- the pieces, in process ----------------------------------------------------------------------------------------
def _hello_all(c: Coordinator, pids=(100, 101)):
    for r, pid in enumerate(pids):
        c.handle({"type": "hello", "rank": r, "host": "h", "pid": pid, "reports": r == 0, "_gen": c.generation})


def test_restart_ignores_the_dead_group_and_does_not_rewrite_replayed_steps(tmp_path):
    writer = RunWriter(tmp_path)
    c = Coordinator(2, writer=writer, heartbeat_timeout=1000, extra_summary={"restarts": 0})
    _hello_all(c)
    for step in (5, 10, 15):
        c.handle({"type": "log", "rank": 0, "record": {"step": step, "loss": 1.0 / step}, "_gen": 0})
    c.handle({"type": "eof", "rank": 1, "_gen": 0})
    assert c.failure is not None and c.failure.rank == 1 and "ended without reporting" in c.failure.reason
    old_token = c.token
    c.restart()
    c.extra_summary["restarts"] = 1
    assert c.failure is None and c.generation == 1 and c.token != old_token
    c.handle({"type": "eof", "rank": 0, "_gen": 0})  # the old group's rank 0, killed by the launcher
    assert c.failure is None
    _hello_all(c, pids=(200, 201))
    for step in (15, 20):  # resumed from the checkpoint of step 10: 15 replays
        c.handle({"type": "log", "rank": 0, "record": {"step": step, "loss": 0.5 / step}, "_gen": 1})
    c.handle({"type": "log", "rank": 0, "record": {"step": 20, "eval": {"loss": 0.1}}, "_gen": 1})
    c.handle({"type": "summary", "rank": 0, "_gen": 1,
              "summary": {"steps": 20, "wall_s": 1.0, "final_loss": 0.025, "eval": {"loss": 0.1}}})
    for r in (0, 1):
        c.handle({"type": "done", "rank": r, "_gen": 1})
    assert c.finished and c.replayed == 1
    c.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], "eval" in r) for r in rows] == [(5, False), (10, False), (15, False), (20, False), (20, True)]
    assert rows[2]["loss"] == pytest.approx(1 / 15)  # the first writing of step 15 stays
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 20
    assert format_done(summary, tmp_path) == ("done: 20 steps in 1.0s (1 restart); final loss 0.0250; eval loss 0.1000; "
                                   f"run directory {tmp_path}")


def test_only_dead_silent_or_hung_groups_are_restarted():
    assert _recoverable(Failure(1, 20, "its process ended without reporting (killed, ...)"))
    assert _recoverable(Failure(1, 20, "hung: ranks [0] have waited for it in a collective for 20 s"))
    assert not _recoverable(Failure(1, 20, "raised an exception", "Traceback ...\nValueError: bad"))
    assert not _recoverable(Failure(None, None, "interrupted (Ctrl-C)"))


def test_recovery_settings_from_config_else_environment_else_default():
    no_field = SimpleNamespace(cluster=SimpleNamespace())
    assert recovery_settings(no_field, env={}) == {"max_restarts": 3, "heartbeat_timeout": 30.0,
                                                   "stall_timeout": 20.0}
    got = recovery_settings(no_field, env={"NDTRAIN_MAX_RESTARTS": "1", "NDTRAIN_STALL_TIMEOUT": "4.5"})
    assert got["max_restarts"] == 1 and isinstance(got["max_restarts"], int) and got["stall_timeout"] == 4.5
    with_field = SimpleNamespace(cluster=SimpleNamespace(max_restarts=0))
    assert recovery_settings(with_field, env={"NDTRAIN_MAX_RESTARTS": "5"})["max_restarts"] == 0
    with pytest.raises(ValueError, match="NDTRAIN_MAX_RESTARTS"):
        recovery_settings(no_field, env={"NDTRAIN_MAX_RESTARTS": "many"})
    with pytest.raises(ValueError, match="max_restarts"):
        recovery_settings(no_field, env={"NDTRAIN_MAX_RESTARTS": "-1"})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hung_worker_is_restarted_and_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """NDTRAIN_TEST_HANG hangs rank 1 at step 25 (once: the restarted group runs clean); the stall rule notices in
    3 s, the group restarts from step 20, and the final parameters and optimizer state equal those of a run that
    never stopped, bit for bit."""
    pytest.importorskip("ray")
    import numpy as np
    base = [sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp", "--backend", "ray",
            "--workers", "2", "--threads", "1", "--steps", "60", "--checkpoint-every", "10", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    finals = {}
    for name, extra in (("plain", {}), ("hung", {"NDTRAIN_TEST_HANG": "1:25", "NDTRAIN_STALL_TIMEOUT": "3"})):
        out = tmp_path / name
        r = subprocess.run([*base, "--out", str(out)], env={**env, **extra}, capture_output=True, text=True,
                           timeout=140)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["restarts"] == (1 if name == "hung" else 0)
        finals[name] = ckpt.load(out / "checkpoints")
    assert "rank 1 failed at step 25: hung" in r.stderr
    a, b = finals["plain"], finals["hung"]
    assert a.step == b.step == 60
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    for k, v in a.optim.items():
        assert np.array_equal(np.asarray(v), np.asarray(b.optim[k])), k
