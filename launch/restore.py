"""Load a trained model back from a run directory (launch/rundir.py): the one place `ndtrain eval`, `ndtrain
generate` and the report's attention maps rebuild a model.

    run = load_run("runs/reverse")             # config + task info + latest valid checkpoint, in eval mode
    run.model                                  # the TaskModel (run.model.module: the engine Module)
    run.tokenizer                              # the task's tokenizer (text tasks), else None
    val = split_dataset(run.cfg, "val")        # the rows the trainer evaluated on (its own loader)

What is read, in order of preference:
  config      the checkpoint's own `config` record (exactly what built its parameters), else DIR/config.toml
  task info   DIR/task_info.json or the checkpoint's `task_info` record, if a trainer wrote them; else the data
              directory's train manifest (data.dir, or --data), else the built-in task's generator (1 row: a
              built-in task's TaskInfo does not depend on the row count)
  tokenizer   DIR/tokenizer.json if present; else the data directory's tokenizer file; else the built-in task's
              (TaskInfo.extra["tokenizer_json"])
  checkpoint  the newest DIR/checkpoints/ckpt-*.json whose npz passes its sha256 check (older ones are tried
              when the newest is damaged, with a note on stderr)
Every failure is a RunError (a UsageError: one line, exit status 2) naming the file.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.data import tasks
from ndtrain.data.info import TaskInfo
from ndtrain.data.reader import check_expected, manifest_info, read_manifest
from ndtrain.data.shards import DataError
from ndtrain.data.tokenizer import load_tokenizer, tokenizer_from_json
from ndtrain.engine.params import ParamStore
from ndtrain.launch import rundir
from ndtrain.launch.config import ConfigError, from_dict, load_config, validate
from ndtrain.launch.errors import UsageError
from ndtrain.launch.job import build_model_for
from ndtrain.launch.task_data import load_task_data
from ndtrain.cluster.worker_process import default_threads, set_up_process_memory
from threadpoolctl import threadpool_limits


class RunError(UsageError):
    """A run directory that cannot be loaded; the message names the file."""


@dataclass
class Restored:
    run_dir: Path
    cfg: object  # launch.config.Config
    info: object  # data.info.TaskInfo
    model: object  # launch.models.TaskModel, in eval mode
    store: object  # engine.params.ParamStore holding the checkpoint's parameters
    step: int  # the checkpoint's step
    checkpoint: Path  # the checkpoint JSON that was loaded
    tokenizer: object = None  # data.tokenizer.Tokenizer or None

    @property
    def kind(self) -> str:
        return self.info.kind


# -- pieces ------------------------------------------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path) -> Path:
    d = Path(run_dir)
    if not d.is_dir():
        raise RunError(f"{d}: no such run directory")
    if not (d / rundir.CONFIG).is_file():
        raise RunError(f"{d / rundir.CONFIG}: missing - not a run directory written by `ndtrain train`")
    return d


def load_checkpoint(run_dir: Path, which: str | None = None):
    """The newest checkpoint of run_dir that loads and passes its sha256 check (cluster.checkpoint.Checkpoint), or
    the one `which` names: "latest" (the default), "avg" (DIR/checkpoints/avg.json, from `ndtrain average`), a
    step number (ckpt-<step>), or a checkpoint JSON path."""
    if which not in (None, "", "latest"):
        if which.isdigit():
            path = rundir.checkpoints_dir(run_dir) / f"ckpt-{int(which):08d}.json"
        elif "/" not in which and not which.endswith(".json"):
            path = rundir.checkpoints_dir(run_dir) / f"{which}.json"
        else:
            path = Path(which)
        try:
            return ckpt.load(path)
        except ckpt.CheckpointError as e:
            hint = " (make it with `ndtrain average`)" if which == "avg" else ""
            raise RunError(f"--checkpoint {which}: {e}{hint}") from None
    found = ckpt.list_checkpoints(rundir.checkpoints_dir(run_dir))
    if not found:
        raise RunError(f"{rundir.checkpoints_dir(run_dir)}: no checkpoint (ckpt-*.json) - did the run finish its first "
                       f"checkpoint?")
    errors = []
    for path in reversed(found):
        try:
            c = ckpt.load(path)
        except ckpt.CheckpointError as e:
            errors.append(str(e))
            print(f"ndtrain: skipping damaged checkpoint: {e}", file=sys.stderr)
            continue
        return c
    raise RunError(f"{rundir.checkpoints_dir(run_dir)}: no valid checkpoint ({len(errors)} damaged; newest: {errors[0]})")


def run_config(run_dir: Path, checkpoint=None):
    """The Config that built the checkpoint's parameters (see the module docstring)."""
    if checkpoint is not None and isinstance(checkpoint.meta.get("config"), dict):
        try:
            return from_dict(checkpoint.meta["config"])
        except ConfigError as e:
            raise RunError(f"{checkpoint.path}: its config record is invalid: {e}") from None
    return validate(load_config(run_dir / rundir.CONFIG))


def _data_split_dir(data_dir: str | Path, split: str) -> Path:
    """data.dir holds train/ and val/ (ndtrain data prepare); a split directory itself is accepted too."""
    d = Path(data_dir)
    if (d / split / "manifest.json").is_file():
        return d / split
    if (d / "manifest.json").is_file():
        return d
    raise RunError(f"{d}: no prepared split {split!r} here (expected {d / split / 'manifest.json'})")


def _task_info(record, where) -> object:
    """TaskInfo from a JSON record (task_info.json, a checkpoint's task_info): RunError naming `where` if malformed."""
    try:
        if callable(record):
            record = record()
        return TaskInfo(**record)
    except (TypeError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RunError(f"{where}: not a valid task info record ({e})") from None


def _load_tokenizer(path: Path):
    try:
        return load_tokenizer(path)
    except ValueError as e:  # names the file (and field)
        raise RunError(str(e)) from None


def task_info_and_tokenizer(cfg, run_dir: Path | None = None, checkpoint=None, data_dir: str | None = None):
    """(TaskInfo, Tokenizer | None) the model was built with (see the module docstring)."""
    info = None
    saved = run_dir / rundir.TASK_INFO if run_dir is not None else None
    if saved is not None and saved.is_file():
        info = _task_info(lambda: json.loads(saved.read_text(encoding="utf-8")), saved)
    elif checkpoint is not None and isinstance(checkpoint.meta.get("task_info"), dict):
        info = _task_info(checkpoint.meta["task_info"], f"{checkpoint.path}: field 'task_info'")
    tokenizer = None
    if run_dir is not None and (run_dir / rundir.TOKENIZER).is_file():
        tokenizer = _load_tokenizer(run_dir / rundir.TOKENIZER)
    # A run directory that saved its task info (and its tokenizer, for text tasks) needs no data directory: eval
    # and generate keep working after the data is moved or deleted. An explicit --data still takes precedence.
    self_contained = saved is not None and saved.is_file() and (
        tokenizer is not None or info.kind in ("classification", "regression"))
    data_dir = data_dir or (None if self_contained else cfg.data.dir)
    if data_dir:
        split_dir = _data_split_dir(data_dir, "train") if (Path(data_dir) / "train").is_dir() else \
            _data_split_dir(data_dir, "val")
        try:
            m = read_manifest(split_dir)
        except DataError as e:
            raise RunError(str(e)) from None
        info = info or manifest_info(m)
        if tokenizer is None and m.get("tokenizer"):
            tpath = split_dir / m["tokenizer"]["file"]
            if not tpath.is_file():
                raise RunError(f"{tpath}: tokenizer named by {split_dir / 'manifest.json'} is missing")
            tokenizer = _load_tokenizer(tpath)
    elif info is None or tokenizer is None:
        if cfg.run.task not in tasks.TASKS:
            raise RunError(f"run.task: unknown task {cfg.run.task!r} and no data.dir: cannot rebuild the task")
        gen_info, _ = tasks.generate(cfg.run.task, 1, cfg.run.seed, "train")
        info = info or gen_info
    if tokenizer is None and info.extra.get("tokenizer_json"):
        tokenizer = tokenizer_from_json(info.extra["tokenizer_json"], source=f"task {info.name!r}")
    return info, tokenizer


def split_dataset(cfg, split: str = "val", data_dir: str | None = None, expect=None):
    """The rows of `split` exactly as the trainer loads them (launch.task_data.load_task_data: data.dir, the shard
    cache or the built-in task regenerated from (task, data.rows, run.seed)). data_dir overrides data.dir;
    expect (a TaskInfo) checks that other data fits the model (vocabulary, kind)."""
    if split not in ("train", "val"):
        raise RunError(f"--split: must be train or val, got {split!r}")
    if data_dir:
        cfg = copy.deepcopy(cfg)
        cfg.data.dir = str(data_dir)
    _, train, val = load_task_data(cfg)
    ds = train if split == "train" else val
    if expect is not None and ds.source != "<memory>":
        try:
            check_expected(read_manifest(ds.source), expect, f"{ds.source}/manifest.json")
        except DataError as e:
            raise RunError(str(e)) from None
    return ds


# -- the whole model ------------------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, *, data_dir: str | None = None, checkpoint: str | None = None) -> Restored:
    """Rebuild the trained TaskModel of run_dir in eval mode (see the module docstring); checkpoint: which one
    (load_checkpoint), default the newest valid."""
    d = check_run_dir(run_dir)
    c = load_checkpoint(d, checkpoint)
    cfg = run_config(d, c)
    info, tokenizer = task_info_and_tokenizer(cfg, d, c, data_dir)
    try:
        model = build_model_for(cfg, info)
    except UsageError as e:  # ConfigError included: the builders name the field
        raise RunError(f"{c.path}: cannot rebuild model {cfg.run.model!r}: {e}") from None
    dtype = np.dtype(c.meta.get("dtype") or cfg.run.dtype)
    store = ParamStore.from_module(model.module, dtype=dtype, seed=cfg.run.seed)
    try:
        ckpt.restore(c, store, model.module)
    except ckpt.CheckpointError as e:
        raise RunError(f"{e} (was the run's config or task changed after training?)") from None
    model.module.eval()
    model.set_tokenizer(tokenizer)
    return Restored(run_dir=d, cfg=cfg, info=info, model=model, store=store, step=c.step, checkpoint=c.path,
                    tokenizer=tokenizer)


def pinned_threads(threads: int | None):
    """A context pinning BLAS threads (threadpoolctl) for eval / generate, as `train` pins its workers: --threads,
    else OMP/OPENBLAS/MKL_NUM_THREADS when set, else all cores (one process)."""
    if threads is not None and threads < 1:
        raise RunError(f"--threads: must be >= 1, got {threads}")
    set_up_process_memory()  # as a trainer process: freed memory is kept for the next batch (no page faults)
    return threadpool_limits(limits=threads or default_threads(1), user_api="blas")


__all__ = ["pinned_threads", "RunError", "Restored", "load_run", "split_dataset", "task_info_and_tokenizer", "run_config",
           "load_checkpoint", "check_run_dir"]
