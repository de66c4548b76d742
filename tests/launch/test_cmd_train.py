"""`ndtrain train` end to end on the local backend: convergence, the run-directory contract, errors that name the
field (exit 2), determinism, checkpoints during the run and exact resume."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.cli import main
from ndtrain.launch.rundir import eval_events, read_metrics, read_summary, train_events
from helpers.runs import train


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    """report.html and TensorBoard cost seconds per run; tests/launch/test_trainer_polish.py covers them."""
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


def params_of(out) -> dict:
    return ckpt.load(out / "checkpoints").params


def test_xor_2_4_1_mlp_reaches_accuracy_1(tmp_path):
    out = train(tmp_path / "xor", "--task", "xor", "--model", "mlp")
    s = read_summary(out)
    assert s["eval"]["accuracy"] == 1.0
    p = params_of(out)
    assert p["0.W"].shape == (2, 4) and p["2.W"].shape == (4, 1)  # the classic 2-4-1 network (preset)


def test_run_directory_contract(tmp_path):
    out = train(tmp_path / "sine", "--task", "sine", "--model", "mlp", "--steps", "40", "--set", "run.log_every=10",
                "--set", "run.eval_every=20", "--checkpoint-every", "10", "--set", "run.keep_checkpoints=2")
    with open(out / "config.toml", "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["run"]["task"] == "sine" and cfg["run"]["steps"] == 40 and cfg["run"]["checkpoint_every"] == 10
    rows = read_metrics(out)
    tr, ev = train_events(rows), eval_events(rows)
    assert [r["step"] for r in tr] == [10, 20, 30, 40]
    for r in tr:
        assert {"step", "loss", "lr", "time"} <= set(r) and np.isfinite(r["loss"])
    assert [r["step"] for r in ev] == [20, 40] and set(ev[-1]["eval"]) == {"loss", "mse"}
    s = read_summary(out)
    assert {"steps", "wall_s", "final_loss", "eval"} <= set(s) and s["steps"] == 40
    assert s["final_loss"] == tr[-1]["loss"] and s["eval"] == ev[-1]["eval"]
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-00000030.json", "ckpt-00000040.json"]  # every 10, keep 2, one at the end
    c = ckpt.load(out / "checkpoints")
    assert c.step == 40 and c.meta["loader"]["batches_done"] >= 0 and c.meta["config"]["run"]["task"] == "sine"
    assert not [p for p in out.rglob(".*")]  # no temp files left behind


@pytest.mark.parametrize("args, field", [
    (["--task", "nosuch"], "run.task"),
    (["--model", "nosuch"], "run.model"),
    (["--set", "optim.lrr=1"], "optim.lrr"),
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "run.steps=many"], "run.steps"),
    (["--set", "model.hiden=[4]"], "model.hiden"),
    (["--set", "optim.name=adamax"], "optim.name"),
    (["--set", "optim.schedule=zigzag"], "optim.schedule"),
    (["--steps", "0"], "run.steps"),
])
def test_bad_input_exits_2_naming_the_field(tmp_path, capsys, args, field):
    out = tmp_path / "bad"
    rc = main(["train", "--task", "xor", "--model", "mlp", "--steps", "3", "--out", str(out), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and f"error: {field}" in err
    assert not out.exists()  # validated before anything was written


def test_bad_config_file_names_file_and_field(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text('[run]\ntask = "xor"\nbatch_size = "big"\n')
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "run.batch_size" in err and "c.toml" in err


def test_console_script_one_line_error():
    exe = Path(sys.executable).with_name("ndtrain")  # the console script beside the venv's python
    if not exe.exists():
        pytest.skip("no ndtrain console script beside this python")
    r = subprocess.run([str(exe), "train", "--task", "nosuch", "--model", "mlp"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "run.task" in r.stderr


def test_print_config(tmp_path, capsys):
    assert main(["train", "--task", "digits", "--model", "mlp", "--set", "optim.lr=0.5", "--print-config"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.5 and cfg["model"]["hidden"] == [256] and cfg["run"]["task"] == "digits"


def test_preset_model_table_only_for_its_family(tmp_path, capsys):
    main(["train", "--task", "xor", "--print-config"])
    assert tomllib.loads(capsys.readouterr().out)["model"] == {"hidden": [4], "activation": "tanh"}


def test_same_command_same_seed_gives_identical_parameters(tmp_path):
    args = ["--task", "spirals", "--model", "mlp", "--steps", "30", "--set", "model.dropout=0.1"]
    a = params_of(train(tmp_path / "a", *args, "--seed", "3"))
    b = params_of(train(tmp_path / "b", *args, "--seed", "3"))
    c = params_of(train(tmp_path / "c", *args, "--seed", "4"))
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)


def test_resume_is_exact(tmp_path):
    """20 steps straight == 10 steps, then resume from the checkpoint for 10 more (params, optimizer, loader and
    dropout RNG all restored), bit for bit."""
    args = ["--task", "spirals", "--model", "mlp", "--set", "model.dropout=0.1", "--set", "optim.schedule=cosine", "--set", "optim.schedule_kwargs.total_steps=20",
            "--batch-size", "48", "--seed", "1"]
    full = train(tmp_path / "full", *args, "--steps", "20")
    half = train(tmp_path / "half", *args, "--steps", "10")
    first = ckpt.latest(half / "checkpoints")
    # the schedule spans the whole run: resume with the same total (steps=20), as the full run had
    resumed = train(tmp_path / "half", *args, "--steps", "20", "--resume", str(first))
    a, b = params_of(full), params_of(resumed)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert read_summary(resumed)["steps"] == 20
    assert ckpt.load(full / "checkpoints").optim["exp_avg"].tobytes() == \
        ckpt.load(resumed / "checkpoints").optim["exp_avg"].tobytes()


def test_digits_mlp_reaches_97_percent(tmp_path):
    out = train(tmp_path / "digits", "--task", "digits", "--model", "mlp", "--threads", "1")
    assert read_summary(out)["eval"]["accuracy"] >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mpi", "ray"])
def test_two_workers_equal_one_worker(tmp_path, backend):
    """The same command (global batch, seed, steps) with 2 workers ends where 1 worker does (float64)."""
    args = ["--task", "spirals", "--model", "mlp", "--steps", "20", "--set", "run.dtype=\"float64\""]
    one = train(tmp_path / "one", *args)
    two = train(tmp_path / "two", *args, "--backend", backend, "--workers", "2")
    a, b = params_of(one), params_of(two)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-12)


def test_arrow_shards_train_exactly_like_memory(tmp_path):
    """data.cache: the task is prepared once as Arrow shards and memory-mapped; same rows, same order, same bits."""
    args = ["--task", "spirals", "--model", "mlp", "--steps", "25"]
    mem = train(tmp_path / "mem", *args)
    shards = train(tmp_path / "shards", *args, "--set", f"data.cache={json.dumps(str(tmp_path / 'cache'))}")
    assert list((tmp_path / "cache").glob("spirals-*/train/manifest.json"))
    a, b = params_of(mem), params_of(shards)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert read_summary(mem)["eval"] == read_summary(shards)["eval"]


@pytest.mark.parametrize("sets, field", [(["data.dir=\"/nonexistent/data\""], "data.dir"),
                                         (["run.resume=\"/nonexistent/ckpt-1.json\""], "run.resume")])
def test_bad_data_dir_or_resume_path_exit_2(tmp_path, capsys, sets, field):
    args = ["train", "--task", "xor", "--steps", "2", "--out", str(tmp_path / "o"), "-q"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {field}: " in err and "/nonexistent/" in err and err.count("\n") == 1


def test_tampered_checkpoint_cannot_be_resumed(tmp_path, capsys):
    out = train(tmp_path / "t", "--task", "xor", "--steps", "5")
    js = ckpt.latest(out / "checkpoints")
    npz = js.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    assert main(["train", "--task", "xor", "--steps", "10", "--out", str(out), "--resume", str(js), "-q"]) == 2
    assert npz.name in capsys.readouterr().err
