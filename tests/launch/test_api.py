"""The Python API (ndtrain.train / ndtrain.load / __version__ / `python -m ndtrain`): presets applied as the CLI
applies them, the same validation gate, a loaded run that evaluates and decodes like `ndtrain eval` / `generate`,
and the README's example, run as written."""
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import ndtrain
from ndtrain.launch.cli import main
from ndtrain.launch.config import ConfigError
from ndtrain.launch.rundir import read_summary

ROOT = Path(__file__).resolve().parents[2]
TINY_REVERSE = {"model.d_model": 16, "model.d_ff": 32, "model.n_heads": 2, "model.n_enc_layers": 1,
                "model.n_dec_layers": 1, "data.rows": 2000}


def test_version_and_python_dash_m():
    assert ndtrain.__version__ == metadata.version("ndtrain")
    r = subprocess.run([sys.executable, "-m", "ndtrain", "train", "--task", "xor", "--model", "transformer"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "run.model:" in r.stderr


def test_train_applies_the_preset_like_the_cli(tmp_path):
    """ndtrain.train(task="xor", ...) trains exactly what `ndtrain train --task xor ...` trains (the xor preset:
    the 2-4-1 network), bit for bit."""
    s = ndtrain.train(task="xor", steps=50, out=str(tmp_path / "api"), quiet=True)
    assert main(["train", "--task", "xor", "--steps", "50", "--out", str(tmp_path / "cli"), "-q"]) == 0
    cli = read_summary(tmp_path / "cli")
    assert s["param_checksum"] == cli["param_checksum"] and s["eval"] == cli["eval"] and s["params"] == 17


def test_train_takes_a_dict_and_dotted_overrides(tmp_path):
    s = ndtrain.train({"run": {"task": "spirals", "steps": 20}, "model": {"hidden": [8]}}, out=str(tmp_path),
                      quiet=True, **{"optim.lr": 0.05, "run.log_every": 5})
    assert s["steps"] == 20 and s["params"] == 2 * 8 + 8 + 8 * 1 + 1  # 2-8-1: one logit for two classes
    cfg = (tmp_path / "config.toml").read_text()
    assert "lr = 0.05" in cfg and "log_every = 5" in cfg


def test_train_refuses_mistakes_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"^run\.model: 'transformer' needs a seq2seq task"):
        ndtrain.train(task="xor", model="transformer", out=str(tmp_path / "a"), quiet=True)
    with pytest.raises(ConfigError, match=r"^stepz: not a run\.\* field"):
        ndtrain.train(task="xor", stepz=3, out=str(tmp_path / "b"), quiet=True)
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0"):
        ndtrain.train(task="xor", out=str(tmp_path / "c"), quiet=True, **{"optim.lr": 0})
    assert not any(tmp_path.iterdir())  # nothing was written


def test_load_evaluates_and_generates_like_the_cli(tmp_path, capsys):
    out = tmp_path / "rev"
    s = ndtrain.train(task="reverse", steps=30, out=str(out), quiet=True, **TINY_REVERSE)
    run = ndtrain.load(out)
    assert run.step == 30 and "reverse" in repr(run)
    assert run.evaluate() == pytest.approx(s["eval"])  # the trainer's figures, from the checkpoint
    capsys.readouterr()
    assert main(["generate", "--run", str(out), "12345"]) == 0
    cli_line = capsys.readouterr().out.strip()
    assert run.generate("12345") == cli_line and run.generate(["12345", "9"])[0] == cli_line


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written, in a fresh directory."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^\n]*-->\n(?:<!-- no-test -->\n)?```python\n(.*?)```", text, re.S)
    assert m, "README.md: the api-example block is gone"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md api-example", "exec"), {"__name__": "__readme__"})
    s = read_summary(tmp_path / "runs" / "api-demo")
    assert s["steps"] == 300 and set(s["eval"]) >= {"loss", "exact_match"}
