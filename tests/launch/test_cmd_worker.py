"""`ndtrain worker --config`: a rank started by someone else (alone here, or under mpirun) trains what `ndtrain
train` trains from the same resolved config."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.cli import main
from ndtrain.launch.rundir import read_summary
from helpers.runs import config_file


def _config(tmp_path, out, *sets):
    return config_file(tmp_path / f"{Path(out).name}.toml", out, "run.task=\"spirals\"", "run.steps=20",
                       "run.dtype=\"float64\"", "model.hidden=[8]", *sets)


def test_worker_alone_equals_train(tmp_path, monkeypatch):
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "NDTRAIN_COORD_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert main(["worker", "--config", str(_config(tmp_path, tmp_path / "w")), "-q"]) == 0
    assert main(["train", "--config", str(_config(tmp_path, tmp_path / "t")), "-q"]) == 0
    a, b = ckpt.load(tmp_path / "w" / "checkpoints").params, ckpt.load(tmp_path / "t" / "checkpoints").params
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert (tmp_path / "w" / "config.toml").exists() and read_summary(tmp_path / "w")["steps"] == 20


def test_worker_bad_config_exits_2(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nlr = 0\n")
    assert main(["worker", "--config", str(p)]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_mpirun_two_workers_equal_one(tmp_path):
    mpiexec = Path(sys.executable).with_name("mpiexec")
    exe = Path(sys.executable).with_name("ndtrain")
    if not mpiexec.exists() or not exe.exists():
        pytest.skip("no mpiexec / ndtrain console script in this venv")
    one = _config(tmp_path, tmp_path / "one")
    two = _config(tmp_path, tmp_path / "two")
    assert main(["worker", "--config", str(one), "-q"]) == 0
    cmd = [str(mpiexec), "-n", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = {k: v for k, v in os.environ.items() if k != "NDTRAIN_COORD_ADDR"}
    r = subprocess.run(cmd + [str(exe), "worker", "--config", str(two), "-q"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    a, b = ckpt.load(tmp_path / "one" / "checkpoints").params, ckpt.load(tmp_path / "two" / "checkpoints").params
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-10, atol=1e-13)
    assert read_summary(tmp_path / "two")["world_size"] == 2
