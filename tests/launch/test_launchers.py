"""Both launchers end to end with the probe target: results in the run directory, and a rank that raises ends the
whole job non-zero with its rank, step and traceback within 30 s (pytest-timeout bounds each test)."""
import json

import pytest

from ndtrain.launch.rundir import RunWriter, read_metrics

PROBE = "ndtrain.cluster.probe:probe_rank"


def _check_run_dir(out, steps, W):
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["reporting_ranks"] == W and r["loss"] == pytest.approx(sum(range(1, W + 1)) / W) for r in rows)
    ranks = json.loads((out / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == list(range(W)) and len({r["pid"] for r in ranks}) == W
    topo = json.loads((out / "topology.json").read_text())
    assert topo["ranks"] == W and topo["threads_per_rank"] == 1


# -- MPI -----------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_mpi_job_runs_and_writes_run_directory(mpi_ok, tmp_path):
    from ndtrain.launch.launch_mpi import run_mpi
    rc = run_mpi(PROBE, {"steps": 4, "size": 300_000}, workers=2, writer=RunWriter(tmp_path),
                 threads=1, global_batch=8)
    assert rc == 0
    _check_run_dir(tmp_path, 4, 2)


@pytest.mark.timeout(30)
def test_mpi_rank_that_raises_ends_job_nonzero(mpi_ok, tmp_path, capfd):
    from ndtrain.launch.launch_mpi import run_mpi
    rc = run_mpi(PROBE, {"steps": 50, "size": 1000, "fail_rank": 1, "fail_step": 3}, workers=2,
                 writer=RunWriter(tmp_path), threads=1)
    err = capfd.readouterr().err
    assert rc != 0
    assert "rank 1 failed at step 3" in err and "deliberate failure on rank 1 at step 3" in err
    assert "Traceback" in err


# -- Ray (the ray_session fixture, one Ray session per module, is in conftest.py) ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["shm", pytest.param("tcp", marks=pytest.mark.slow)])
def test_ray_job_runs_and_writes_run_directory(ray_session, tmp_path, transport):
    from ndtrain.launch.launch_ray import run_ray
    rc = run_ray(PROBE, {"steps": 3, "size": 300_000}, workers=2, writer=RunWriter(tmp_path),
                 threads=1, transport=transport)
    assert rc == 0
    _check_run_dir(tmp_path, 3, 2)
    assert json.loads((tmp_path / "topology.json").read_text())["transport"] == transport


@pytest.mark.timeout(30)
def test_ray_rank_that_raises_ends_job_nonzero(ray_session, tmp_path, capfd):
    from ndtrain.launch.launch_ray import run_ray
    rc = run_ray(PROBE, {"steps": 50, "size": 1000, "fail_rank": 0, "fail_step": 2}, workers=2,
                 writer=RunWriter(tmp_path), threads=1)
    err = capfd.readouterr().err
    assert rc != 0
    assert "rank 0 failed at step 2" in err and "deliberate failure on rank 0 at step 2" in err
