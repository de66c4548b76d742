"""Shared ways to make a run in a test: the CLI's `ndtrain train`, a validated Config, and the tiny model sizes
that keep a Transformer test to seconds on a loaded 2-core machine."""
from __future__ import annotations

from pathlib import Path

from ndtrain.launch.cli import main
from ndtrain.launch.config import Config, apply_overrides, validate, write_config


def sets(**values) -> list[str]:
    """["--set", "k=v", ...] for `ndtrain train` from model-table keys: sets(d_model=16) -> model.d_model=16."""
    out = []
    for key, value in values.items():
        out += ["--set", f"{key if '.' in key else 'model.' + key}={value}"]
    return out


TINY_TRANSFORMER = sets(d_model=16, n_heads=2, d_ff=32, n_enc_layers=1, n_dec_layers=1)  # the seq2seq family
TINY_LM = sets(d_model=16, n_heads=2, d_ff=32, n_layers=1)  # the decoder-only family


def train(out, *args) -> Path:
    """`ndtrain train --out OUT --quiet ARGS`, which must succeed; returns OUT."""
    assert main(["train", "--out", str(out), "--quiet", *args]) == 0
    return Path(out)


def make_cfg(out, *overrides: str, workers: int = 1) -> Config:
    """A validated Config over the defaults (no preset): run.out = out, one BLAS thread, `section.key=value`
    overrides, and `workers` ranks (the local backend for one, mpi for more, as the thread-rank tests need)."""
    cfg = Config()
    cfg.run.out = str(out)
    cfg.run.threads = 1
    apply_overrides(cfg, list(overrides))
    cfg.run.workers = workers
    cfg.run.backend = "local" if workers == 1 else "mpi"
    return validate(cfg)


def config_file(path, out, *overrides: str) -> Path:
    """make_cfg written as TOML to path (what `ndtrain worker --config` / `train --config` read)."""
    write_config(make_cfg(out, *overrides), path)
    return Path(path)
