"""The one validation gate (launch/gate.py): task/model and model/data compatibility, the optimizer and schedule,
the [model] table and the checkpoint to resume from are all checked in the driver, before any worker starts, with
the builders the ranks use; each mistake is one line naming the field, exit 2, nothing written, no process."""
import subprocess
import sys

import pytest

from ndtrain.launch.cli import main
from ndtrain.launch.config import ConfigError
from ndtrain.launch.gate import check_config
from ndtrain.launch.training import resolve_config
from helpers.runs import TINY_TRANSFORMER

TINY = TINY_TRANSFORMER


def test_xor_transformer_is_one_line_exit_2():
    """The issue's reproduction: this ended in a ValueError traceback."""
    r = subprocess.run([sys.executable, "-m", "ndtrain", "train", "--task", "xor", "--model", "transformer"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("ndtrain train: error: run.model: 'transformer' needs a seq2seq task; task 'xor' is "
                        "classification\n")


@pytest.mark.parametrize("backend", ["local", "mpi", "ray"])
@pytest.mark.parametrize("args, field", [
    (["--task", "xor", "--model", "transformer"], "run.model"),
    (["--task", "reverse", "--model", "mlp"], "run.model"),
    (["--task", "xor", "--model", "nosuch"], "run.model"),
    (["--task", "nosuch"], "run.task"),
    (["--task", "reverse", *TINY, "--set", "model.n_heads=3"], "model.n_heads"),
    (["--task", "reverse", *TINY, "--set", "model.activation=\"tanhh\""], "model.activation"),
    (["--task", "reverse", *TINY, "--set", "model.d_modell=3"], "model.d_modell"),
    (["--task", "xor", "--set", "optim.name=\"adamm\""], "optim.name"),
    (["--task", "xor", "--set", "optim.schedule=\"cosinee\""], "optim.schedule"),
    (["--task", "xor", "--set", "optim.schedule_kwargs.warmup=3"], "optim.schedule_kwargs"),
    (["--task", "xor", "--set", "data.dir=\"/nonexistent/data\""], "data.dir"),
])
def test_incompatible_choices_stop_in_the_driver(tmp_path, capsys, backend, args, field):
    """No run directory, no worker started (for mpi / ray: the topology line is never printed)."""
    out = tmp_path / "o"
    workers = [] if backend == "local" else ["--workers", "2"]
    assert main(["train", "--backend", backend, *workers, *args, "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ndtrain train: error: {field}") and err.count("\n") == 1, err
    assert not out.exists()


def test_model_block_size_against_the_data_blocks(tmp_path, capsys):
    """Model/data compatibility: an LM whose context is shorter than the prepared blocks."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    data = tmp_path / "d"
    assert main(["data", "import", "--text", str(text), "--out", str(data / "train"), "--block-size", "32"]) == 0
    assert main(["data", "import", "--text", str(text), "--out", str(data / "val"), "--block-size", "32",
                 "--tokenizer-file", str(data / "train" / "tokenizer.json")]) == 0
    capsys.readouterr()
    rc = main(["train", "--model", "lm", "--set", f"data.dir=\"{data}\"", "--set", "model.block_size=16",
               "--set", "model.d_model=16", "--set", "model.n_heads=2", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ndtrain train: error: model.block_size: 16 is shorter"), err


def test_resume_past_the_last_step_and_a_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--task", "xor", "--steps", "5", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "5", "-q"]) == 2
    assert "error: run.steps: the checkpoint " in capsys.readouterr().err
    assert main(["train", "--task", "xor", "--resume", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "error: run.resume: " in capsys.readouterr().err


def test_the_gate_resolves_the_checkpoint_every_worker_loads(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--task", "xor", "--steps", "6", "--checkpoint-every", "3", "--out", str(out), "-q"]) == 0
    cfg = resolve_config(task="xor", run={"steps": 9, "resume": str(out / "checkpoints"), "out": str(tmp_path / "r2")})
    job, (info, train, val) = check_config(cfg)
    assert job.start_step == 6 and cfg.run.resume == str((out / "checkpoints" / "ckpt-00000006.json").resolve())
    assert info.name == "xor" and train.n_rows() > 0


def test_builders_raise_the_config_error_naming_the_field():
    """Not ValueError / KeyError from the engine's dataclasses: the field as the user wrote it."""
    from ndtrain.data.info import TaskInfo
    from ndtrain.launch.models import build_model
    info = TaskInfo("s", "seq2seq", src_vocab_size=10, tgt_vocab_size=10, max_src_len=5, max_tgt_len=6)
    with pytest.raises(ConfigError, match=r"^model\.activation: 'tanhh' is not one of"):
        build_model("transformer", info, {"activation": "tanhh", "d_model": 8, "n_heads": 2})
    with pytest.raises(ConfigError, match=r"^model\.cell: must be one of"):
        build_model("seq2seq-rnn", info, {"cell": "rnnn"})
