"""No process outlives its job, and Ctrl-C / SIGTERM stop a run cleanly, on every backend (issue 16, items 1-3).

- Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (to the driver, as `kill` sends it) stop
  the run at a step boundary: exit 130 / 143, the line `interrupted at step N; resume with: ndtrain train --resume
  DIR`, no traceback, a checkpoint of step N; resuming from it ends with parameters and optimizer state bitwise
  equal to an uninterrupted run (MPI and Ray in deterministic mode, resumed on one local rank: the same bits).
- kill -9 of the MPI driver: no rank and no mpiexec/prterun left within 30 s; of the Ray driver: nothing of the job
  (rank actors, the Ray runtime it started, its agents) within 10 s. "Of the job": every process seen below the
  driver while it ran, or in one of their sessions (tests/helpers/procs.py), not matched by name.
- A second Ctrl-C aborts at once (here: while a rank hangs, so the first one cannot finish), still leaving nothing
  (MPI; Ray under -m slow).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.cli import main as cli_main
from helpers.procs import JobProcesses, Lines

DET = ["--set", "run.deterministic=true", "--set", "run.micro_batches=2"]  # W = 1 and 2 give the same bits
DIST_STEPS = 120  # ~6 s of steps (NDTRAIN_TEST_STEP_DELAY) after the first checkpoint: room to signal under load


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    env.update(NDTRAIN_REPORT="0", NDTRAIN_TENSORBOARD="0", RAY_IGNORE_UNHANDLED_ERRORS="1", **extra)
    return env


def _train_argv(out, backend: str, steps: int, *extra) -> list[str]:
    argv = [sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp", "--backend", backend,
            "--steps", str(steps), "--checkpoint-every", "10", "--set", "run.log_every=1000", "--out", str(out), "-q"]
    if backend != "local":
        argv += ["--workers", "2", "--threads", "1"]
    return argv + list(extra)


def _start(argv, env) -> tuple[subprocess.Popen, Lines, JobProcesses]:
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # a session of its own: like a terminal's job, findable after
    return p, Lines(p.stderr), JobProcesses(p)


def _first_checkpoint(out):
    return lambda: ckpt.latest(Path(out) / "checkpoints") is not None


def _send(p: subprocess.Popen, sig: int) -> None:
    """SIGINT as a terminal sends Ctrl-C (to the foreground process group), SIGTERM as `kill` sends it."""
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        os.kill(p.pid, sig)


def _final(out):
    return ckpt.load(Path(out) / "checkpoints")


def _assert_bitwise_equal(a, b):
    assert a.step == b.step
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes(), k
    for k, v in a.optim.items():
        if hasattr(v, "tobytes"):
            assert v.tobytes() == b.optim[k].tobytes(), k


def _assert_interrupted(p, err: Lines, sig: int, out) -> int:
    """The exit status, the resume line, no traceback, and the checkpoint of the step it names. Returns N."""
    assert p.returncode == 128 + sig, err.text()
    text = err.text()
    m = re.search(r"^interrupted at step (\d+); resume with: ndtrain train --resume (\S+)$", text, re.M)
    assert m, text
    assert m.group(2) == str(out), text
    assert "Traceback" not in text, text
    step = int(m.group(1))
    assert int(ckpt.latest(Path(out) / "checkpoints").stem.split("-")[1]) == step
    return step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted deterministic run (one local rank: the same bits as two), in process."""
    out = tmp_path_factory.mktemp("ref") / "run"
    argv = _train_argv(out, "local", DIST_STEPS, *DET)[3:]
    assert cli_main(argv) == 0
    return _final(out)


# -- Ctrl-C and SIGTERM --------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_signal_stops_at_a_step_boundary_with_checkpoint_and_resumes_bitwise(tmp_path, sig):
    out = tmp_path / "run"
    p, err, job = _start(_train_argv(out, "local", 10 ** 6), _env())
    try:
        job.watch(_first_checkpoint(out), 90, "the first checkpoint")
        _send(p, sig)
        p.wait(timeout=60)
    finally:
        job.kill_all()
    n = _assert_interrupted(p, err, sig, out)
    assert n >= 10
    # resume to N + 7 steps; the same run uninterrupted (constant lr: the total does not change the math)
    assert cli_main(["train", "--resume", str(out), "--steps", str(n + 7), "-q"]) == 0
    ref = tmp_path / "ref"
    assert cli_main(_train_argv(ref, "local", n + 7)[3:]) == 0
    _assert_bitwise_equal(_final(out), _final(ref))


def _distributed_interrupt(tmp_path, backend, sig, bound_s):
    """Signal the driver after the first checkpoint; (processes left after bound_s, the interrupted step, whether a
    summary.json was written before the resume, the resume's exit status, the resumed run's final parameters)."""
    out = tmp_path / "run"
    p, err, job = _start(_train_argv(out, backend, DIST_STEPS, *DET), _env(NDTRAIN_TEST_STEP_DELAY="0.05"))
    try:
        job.watch(_first_checkpoint(out), 150, "the first checkpoint")
        _send(p, sig)
        p.wait(timeout=90)
        left, _ = job.wait_gone(bound_s)
    finally:
        job.kill_all()
    n = _assert_interrupted(p, err, sig, out)
    finished = (out / "summary.json").exists()
    # resume on one local rank (deterministic mode: the same bits as two ranks)
    resumed = cli_main(["train", "--resume", str(out), "--backend", "local", "--workers", "1", "-q"])
    return left, n, finished, resumed, _final(out)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_mpi_signal_stops_every_rank_at_one_step_with_checkpoint_and_resumes_bitwise(mpi_ok, tmp_path, sig,
                                                                                    reference):
    left, n, finished, resumed, final = _distributed_interrupt(tmp_path, "mpi", sig, bound_s=30)
    assert not left, f"still running 30 s after the driver ended: {left}"
    assert 10 <= n < DIST_STEPS and not finished  # stopped before the end
    assert resumed == 0
    _assert_bitwise_equal(final, reference)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])  # SIGTERM: ray.init
# replaces the driver's SIGTERM handler; the launcher puts ours back (interrupt.reinstall)
def test_ray_signal_stops_every_rank_at_one_step_with_checkpoint_and_resumes_bitwise(tmp_path, sig, reference):
    pytest.importorskip("ray")
    left, n, finished, resumed, final = _distributed_interrupt(tmp_path, "ray", sig, bound_s=10)
    assert not left, f"still running 10 s after the driver ended: {left}"
    assert 10 <= n < DIST_STEPS and not finished  # stopped before the end
    assert resumed == 0
    _assert_bitwise_equal(final, reference)


# -- kill -9 of the driver -----------------------------------------------------------------------------------------
def _kill_driver(tmp_path, backend, bound_s):
    """kill -9 the driver after the first checkpoint; the job's processes still running bound_s later."""
    out = tmp_path / "run"
    p, err, job = _start(_train_argv(out, backend, 100000), _env(NDTRAIN_TEST_STEP_DELAY="0.05"))
    try:
        job.watch(_first_checkpoint(out), 150, "the first checkpoint")
        time.sleep(0.5)
        job.snapshot()
        assert len(job.seen) >= 3, job.seen  # the driver and its ranks at least
        p.kill()
        p.wait(timeout=10)
        left, _ = job.wait_gone(bound_s)
    finally:
        job.kill_all()
    return left


@pytest.mark.timeout(240)
def test_mpi_driver_kill9_leaves_no_rank_and_no_mpiexec(mpi_ok, tmp_path):
    left = _kill_driver(tmp_path, "mpi", bound_s=30)
    assert not left, f"still running 30 s after kill -9 of the driver: {left}"


@pytest.mark.timeout(240)
def test_ray_driver_kill9_leaves_nothing_of_the_job_within_10s(tmp_path):
    pytest.importorskip("ray")
    left = _kill_driver(tmp_path, "ray", bound_s=10)
    assert not left, f"still running 10 s after kill -9 of the driver: {left}"


# -- a second Ctrl-C -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["mpi", pytest.param("ray", marks=pytest.mark.slow)])
def test_second_ctrl_c_aborts_at_once_and_leaves_no_process(request, tmp_path, backend):
    """Rank 1 hangs at its first step (NDTRAIN_TEST_HANG), so the first Ctrl-C cannot finish; the second ends the
    job."""
    if backend == "mpi":
        request.getfixturevalue("mpi_ok")
    else:
        pytest.importorskip("ray")
    out = tmp_path / "run"
    p, err, job = _start(_train_argv(out, backend, DIST_STEPS),
                         _env(NDTRAIN_TEST_HANG="1:0", NDTRAIN_STALL_TIMEOUT="600"))
    try:
        job.watch(lambda: (out / "ranks.json").exists(), 150, "every rank to connect")
        time.sleep(0.5)
        _send(p, signal.SIGINT)
        err.wait_for(r"SIGINT: stopping at the next step boundary", 30)
        time.sleep(1.0)
        assert p.poll() is None  # the hung rank keeps the first Ctrl-C from finishing
        t0 = time.monotonic()
        _send(p, signal.SIGINT)
        p.wait(timeout=30)
        took = time.monotonic() - t0
        left, _ = job.wait_gone(30)
        assert not left, f"still running after the abort: {left}"
    finally:
        job.kill_all()
    text = err.text()
    assert p.returncode == 130, text
    assert took < 10, f"the second Ctrl-C took {took:.1f} s to end the driver"
    assert re.search(r"^ndtrain train: aborted$", text, re.M), text
    assert "interrupted at step" not in text and "Traceback" not in text, text
