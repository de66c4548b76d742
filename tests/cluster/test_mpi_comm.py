"""MPICommunicator and GradReducer under a real `mpiexec -n 2` (subprocess, bounded by a timeout)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")
from ndtrain.launch.launch_mpi import find_mpiexec, mpi_flavour  # noqa: E402


def mpiexec_or_skip():
    try:
        return find_mpiexec()
    except FileNotFoundError:
        pytest.skip("no mpiexec")


def test_collectives_and_reducer_under_mpiexec():
    mpiexec = mpiexec_or_skip()
    cmd = [mpiexec, "-n", "2"]
    if mpi_flavour(mpiexec) == "openmpi":
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    cmd += [sys.executable, str(Path(__file__).with_name("mpi_collectives_script.py"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(line for line in p.stdout.splitlines() if line.startswith("OK")) == ["OK rank 0", "OK rank 1"]
