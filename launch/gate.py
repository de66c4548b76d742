"""The one validation gate: every user mistake in a training config is found here, in the driver, before any worker
starts, and becomes one ConfigError naming the field (one line on stderr, exit status 2, never a traceback).

    job, data = check_config(cfg)   # cfg validated, run.resume resolved; rank 0's job and (info, train, val)

What it checks, each in the one place that knows it:
  field values          launch.config.validate (types, ranges, choices, cross-field rules)
  the task and its data launch.task_data.load_task_data (unknown task, bad data.dir / data.cache)
  task / model          the model family's builder (launch/models/*): kind of task, [model] keys and values,
  model / data          vocabulary sizes, block size against the data's blocks
  optimizer, schedule   launch.optimizer_setup (optim.name, optim.schedule, schedule_kwargs, hyper-parameters)
  batch / data          the loader (run.batch_size against the rows)
  resume                the checkpoint loads, verifies, fits the model and the data, and is before run.steps
It does so by building rank 0's job (launch.job.build_job) once, which is what the workers will do.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.config import Config, ConfigError, validate
from ndtrain.launch.job import build_job, check_model_name
from ndtrain.launch.task_data import check_task_source, load_task_data


def check_names(cfg: Config) -> Config:
    """The cheap part, without loading data or building anything (`ndtrain train --print-config`): field values,
    the task's source (a built-in task or data.dir/train) and the model's name."""
    validate(cfg)
    check_task_source(cfg)
    check_model_name(cfg.run.model)
    return cfg


def check_config(cfg: Config):
    """Validate cfg completely (see the module docstring); run.resume becomes the checkpoint JSON that will be
    used (warnings for skipped corrupt checkpoints go to stderr). Returns rank 0's job (a local run trains it) and
    the task data, (info, train, val)."""
    validate(cfg)
    data = load_task_data(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ckpt.CheckpointWarning)
        job = build_job(cfg, 0, cfg.run.workers, data)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    if cfg.run.resume:
        if job.start_step >= cfg.run.steps:
            raise ConfigError(f"run.steps: the checkpoint {job.resumed_from} is at step {job.start_step}; run.steps "
                              f"({cfg.run.steps}) must be larger to continue")
        cfg.run.resume = str(Path(job.resumed_from).resolve())  # every worker loads this one
    return job, data
