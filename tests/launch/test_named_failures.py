"""A distributed run that stops for a reason it names (here: non-finite steps, `run.max_nonfinite`) ends as a local
run does: one line naming the rank and step on stderr, exit 2, no traceback, no MPI_ABORT banner, no numpy warning
spam, and Ray does not restart a rank group that would only meet the same failure again."""
import subprocess
import sys

import pytest

BAD_RUN = ["--task", "sine", "--model", "mlp", "--steps", "12", "-q", "--no-report",
           "--set", "optim.lr=1e25", "--set", 'optim.name="sgd"', "--set", "run.max_nonfinite=2"]


def _train(backend: str, out) -> subprocess.CompletedProcess:
    workers = [] if backend == "local" else ["--workers", "2"]
    argv = [sys.executable, "-m", "ndtrain.launch", "train", "--backend", backend, *workers, *BAD_RUN, "--out", str(out)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240)


def _check_one_line(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "MPI_ABORT" not in r.stderr and "RuntimeWarning" not in r.stderr, r.stderr
    named = [line for line in r.stderr.splitlines() if "non-finite steps in a row" in line]
    assert len(named) == 1, r.stderr
    assert named[0].startswith("ndtrain: rank ") and ", step 2:" in named[0] and "run.max_nonfinite" in named[0]
    assert "restarting" not in r.stderr and "--resume" not in r.stderr, r.stderr


def test_mpi_run_that_goes_non_finite_is_one_line_exit_2(tmp_path, mpi_ok):
    _check_one_line(_train("mpi", tmp_path / "run"))


def test_ray_run_that_goes_non_finite_is_one_line_exit_2_without_restarts(tmp_path):
    pytest.importorskip("ray")
    _check_one_line(_train("ray", tmp_path / "run"))


def test_local_run_that_goes_non_finite_prints_no_numpy_warnings(tmp_path):
    r = _train("local", tmp_path / "run")
    assert r.returncode == 2 and "RuntimeWarning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sum("non-finite steps in a row" in line for line in r.stderr.splitlines()) == 1, r.stderr
