"""The shipped presets (configs/*.toml): each loads, validates and names a known model whose [model] keys that family
accepts; `ndtrain train --task T` picks configs/T.toml up for every built-in task; and a 2-step run of each
built-in-task preset (tiny model and data overrides) and of the real-data presets (on a tiny imported corpus) trains
and evaluates to finite numbers."""
import io
import math
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from ndtrain.data import tasks
from ndtrain.launch.cli import main
from ndtrain.launch.cmd_train import preset_path
from ndtrain.launch.config import load_config, model_options, validate
from ndtrain.launch.models import model_names
from ndtrain.launch.rundir import read_summary
from helpers.runs import TINY_LM, TINY_TRANSFORMER

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))
REAL_DATA = ("multi30k", "shakespeare")  # presets for imported corpora (need data.dir)


def _family_defaults(model: str) -> dict | None:
    """The [model] defaults of a family, for checking a preset's keys (None: the family checks its own)."""
    if model in ("transformer", "lm", "classifier"):
        from ndtrain.launch.models.transformer import DEFAULTS
        return DEFAULTS[model]
    if model == "seq2seq-rnn":
        from ndtrain.launch.models.rnn import DEFAULTS
        return DEFAULTS
    return None


def test_every_built_in_task_and_real_run_has_a_preset():
    names = {p.stem for p in PRESETS}
    missing = (set(tasks.TASKS) | set(REAL_DATA)) - names
    assert not missing, f"configs/: no preset for {sorted(missing)}"


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_and_validates(path):
    cfg = validate(load_config(path))
    assert cfg.run.model in model_names(), f"{path.name}: run.model {cfg.run.model!r} is not registered"
    if cfg.run.task in tasks.TASKS:
        assert path.stem == cfg.run.task  # picked up by name: configs/<task>.toml
        assert not cfg.data.dir
    else:
        assert path.stem in REAL_DATA and cfg.data.dir, f"{path.name}: a real-data preset names data.dir"
    defaults = _family_defaults(cfg.run.model)
    if defaults is not None:
        model_options(cfg.model, defaults, cfg.run.model)  # unknown keys / wrong types raise ConfigError
    sched = cfg.optim.schedule_kwargs
    if "warmup_steps" in sched:
        assert 0 <= sched["warmup_steps"] < cfg.run.steps


@pytest.mark.parametrize("task", tasks.TASKS)
def test_train_picks_the_preset_for_the_task(task):
    path = preset_path(task)
    assert path is not None and path.name == f"{task}.toml"
    with open(path, "rb") as f:
        preset = tomllib.load(f)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["train", "--task", task, "--print-config"]) == 0
    resolved = tomllib.loads(buf.getvalue())
    for section, table in preset.items():
        for key, value in table.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key} did not reach the config"


# tiny overrides: a couple of steps on a few rows with a small model, so all presets run in seconds
TINY_SEQ = [*TINY_TRANSFORMER, "--set", "optim.schedule_kwargs.warmup_steps=1"]  # warmup ends before the 2 steps
TINY = {"data.rows": 40, "run.eval_every": 0, "run.log_every": 1, "run.checkpoint_every": 0}


def _tiny_args(task: str) -> list[str]:
    args = []
    for key, value in TINY.items():
        if key == "data.rows" and task == "digits":
            continue  # a fixed data set (sklearn's 8x8 digits)
        args += ["--set", f"{key}={value}"]
    return args


def _train_tiny(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["train", "--out", str(out), "--quiet", "--steps", "2", "--batch-size", "8", *args]) == 0
    s = read_summary(out)
    assert s["steps"] == 2 and math.isfinite(s["final_loss"])
    assert s["eval"] and all(math.isfinite(v) for v in s["eval"].values())
    return s


@pytest.mark.parametrize("task", tasks.TASKS)
def test_two_step_run_of_each_task_preset(tmp_path, task):
    with open(preset_path(task), "rb") as f:
        model = tomllib.load(f)["run"]["model"]
    extra = TINY_SEQ if model == "transformer" else []
    s = _train_tiny(tmp_path, task, "--task", task, *_tiny_args(task), *extra)
    assert s["task"] == task and s["model"] == model


def test_multi30k_preset_on_a_tiny_parallel_corpus(tmp_path):
    from ndtrain.data.importers import import_parallel
    en = tmp_path / "x.en"
    de = tmp_path / "x.de"
    en.write_text("".join(f"a man rides {n} horses .\n" for n in range(12)))
    de.write_text("".join(f"ein mann reitet {n} pferde .\n" for n in range(12)))
    d = tmp_path / "data"
    import_parallel(d / "train", src=en, tgt=de, tokenizer="bpe", vocab_size=260)  # the least byte-level BPE has
    import_parallel(d / "val", src=en, tgt=de, tokenizer_file=d / "train" / "tokenizer.json")
    s = _train_tiny(tmp_path, "m30k", "--config", str(CONFIGS / "multi30k.toml"), "--backend", "local",
                    "--workers", "1", "--set", f"data.dir={d}", "--set", "run.eval_every=0",
                    "--set", "run.checkpoint_every=0", *TINY_SEQ)
    assert s["model"] == "transformer" and "exact_match" in s["eval"]


def test_shakespeare_preset_on_a_tiny_text(tmp_path):
    from ndtrain.data.importers import import_text
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[:800])
    d = tmp_path / "data"
    import_text(tmp_path / "train.txt", d / "train", tokenizer="char", block_size=64)
    import_text(tmp_path / "val.txt", d / "val", tokenizer_file=d / "train" / "tokenizer.json", block_size=64)
    s = _train_tiny(tmp_path, "lm", "--config", str(CONFIGS / "shakespeare.toml"), "--set", f"data.dir={d}",
                    "--set", "run.eval_every=0", *TINY_LM, "--set", "optim.schedule_kwargs.warmup_steps=1")
    assert s["model"] == "lm" and s["eval"]["loss"] > 0
