"""The Python API, for notebooks and scripts: what `ndtrain train`, `ndtrain eval` and `ndtrain generate` do.

    import ndtrain
    summary = ndtrain.train(task="reverse", model="transformer", steps=300, out="runs/rev")
    run = ndtrain.load("runs/rev")
    run.evaluate()                          # {"loss": .., "exact_match": .., ...}
    run.generate(["abc", "hello"])          # the model's outputs, one string per input

train(config=None, /, **overrides) resolves the config as the command line does:
  config   None, or a dict ({"run": {...}, "model": {...}, "optim": {...}}) laid over the task's preset
           (configs/<task>.toml, as `ndtrain train --task T`), or a TOML path or a Config used as the base instead of
           the preset (as `--config FILE`);
  overrides  run.* fields by name (task="xor", steps=600, backend="mpi", workers=2, ...), and "section.key" names
           through a dict: train(task="xor", **{"optim.lr": 0.05});
  quiet    no progress lines (default False); log_format "text" or "json".
It passes the same validation gate: a mistake raises ConfigError (a UsageError) naming the field, before anything
runs. Returns the run's summary (summary.json); a failed distributed job raises TrainingFailed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

from ndtrain.launch import cmd_eval, cmd_generate, training
from ndtrain.launch.config import Config, ConfigError, RunConfig, apply_overrides
from ndtrain.launch.progress import Console
from ndtrain.launch.restore import Restored, load_run, split_dataset
from ndtrain.launch.training import TrainingFailed

RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def _sets(table: dict, prefix: str = "") -> list[str]:
    """A nested dict -> ["section.key=value", ...] as `--set` takes them (a JSON literal is a TOML literal here:
    numbers, strings, booleans, lists; tables are walked into)."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            out += _sets(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def train(config=None, /, *, quiet: bool = False, log_format: str = "text", **overrides) -> dict:
    """Train and return the summary (see the module docstring)."""
    base, table = None, {}
    if isinstance(config, (str, os.PathLike, Config)):
        base = config
    elif isinstance(config, dict):
        table = config
    elif config is not None:
        raise ConfigError(f"config: expected a dict, a TOML path or a Config, got {type(config).__name__}")
    unknown = sorted(k for k in overrides if k not in RUN_FIELDS and "." not in k)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a run.* field (known: {', '.join(sorted(RUN_FIELDS))}); other "
                          f"sections take 'section.key' names, e.g. **{{'optim.lr': 0.01}}")
    run = {k: v for k, v in overrides.items() if k in RUN_FIELDS}
    dotted = _sets({k: v for k, v in overrides.items() if k not in RUN_FIELDS})
    if isinstance(base, Config):
        cfg = apply_overrides(copy.deepcopy(base), _sets(table) + _sets({"run": run}) + dotted)
    else:
        given = table.get("run") if isinstance(table.get("run"), dict) else {}
        task, model = run.pop("task", given.get("task")), run.pop("model", given.get("model"))
        resume = run.pop("resume", None)  # a run directory: its config.toml is the base, as with --resume
        cfg = training.resolve_config(config=base, task=task, model=model, run={"resume": resume},
                                      overrides=_sets(table) + _sets({"run": run}) + dotted)
    return training.train(cfg, Console(cfg.run.steps, log_format, quiet=quiet))


class Run:
    """A trained run loaded back from its directory (launch/restore.py): its model in eval mode, config, task info
    and tokenizer. evaluate() and generate() do what `ndtrain eval` and `ndtrain generate` do."""

    def __init__(self, restored: Restored):
        self.restored = restored
        self.run_dir, self.cfg, self.model, self.step = restored.run_dir, restored.cfg, restored.model, restored.step
        self.tokenizer, self.info = restored.tokenizer, restored.info

    def __repr__(self) -> str:
        return f"<ndtrain run {self.run_dir} step {self.step}: {self.cfg.run.task} / {self.cfg.run.model}>"

    def evaluate(self, split: str = "val", *, data: str | None = None, batch_size: int | None = None,
                 bleu: bool | None = None) -> dict:
        """The loss and the task's metrics over every row of `split` (the trainer's own rows; data: another
        prepared data directory)."""
        dataset = split_dataset(self.cfg, split, data, expect=self.info)
        return cmd_eval.evaluate(self.restored, dataset, batch_size, bleu)

    def generate(self, inputs, *, max_len: int | None = None, beam: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0):
        """seq2seq: the translation of each input; lm: each prompt and its continuation. inputs: a string (returns
        a string) or a list of strings. Greedy by default; beam=N for beam search; temperature / top_k / top_p
        sample."""
        one = isinstance(inputs, str)
        opts = cmd_generate.decoding_options(_Flags(beam, temperature, top_k, top_p))
        out = cmd_generate.generate(self.restored, [inputs] if one else list(inputs), opts, max_len, seed)
        return out[0] if one else out


@dataclasses.dataclass
class _Flags:  # the attributes cmd_generate.decoding_options reads from the command line's namespace
    beam: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None


def load(run_dir: str | os.PathLike, *, data: str | None = None) -> Run:
    """The run in run_dir (its newest valid checkpoint). data: a prepared data directory when the run's own is
    gone and the run directory does not hold its task info."""
    return Run(load_run(Path(run_dir), data_dir=data))


__all__ = ["train", "load", "Run", "TrainingFailed", "ConfigError"]
