"""The run-directory contract. Kept stable: the local trainer, the coordinator and the report tools all use it.

    DIR/config.toml       the resolved configuration (launch.config.write_config)
    DIR/metrics.jsonl     one JSON object per event; train events have at least step, loss, lr, time;
                          eval events have step, time and an `eval` object ({"loss": .., "accuracy": ..} / "mse")
    DIR/summary.json      at least steps, wall_s, final_loss, eval (the task's final metrics)
    DIR/checkpoints/      ckpt-<step>.npz + ckpt-<step>.json (cluster.checkpoint)
    DIR/task_info.json    TaskInfo.to_dict() of the task the model was built for (written by rank 0 at start)
    DIR/tokenizer.json    the task's tokenizer, for text tasks: with task_info.json the directory is self-contained
                          for `ndtrain eval` / `generate` (launch/restore.py)
    DIR/topology.json     backend, hosts, ranks, threads per rank, global / per-rank batch (cluster.supervise)
    DIR/tb/               TensorBoard events (train/<key>, eval/<key>), unless run.tensorboard = false
    DIR/report.html       + DIR/plots/: written when training succeeded, unless run.report = false

Writers append and flush one line per event, so a crash loses at most the event being written; summary.json and
config.toml are replaced atomically (ndtrain.data.atomic: temp file + fsync + rename), so a reader never sees half
a file.

A run never writes into a directory that is not empty (check_run_dir_free): `--resume` continues it, `--overwrite`
first removes the files above (RUN_OUTPUTS, and nothing else: a user's own file beside them stays). Without --out
a run gets a fresh directory, runs/<task>-<model>-<UTC timestamp> (fresh_run_dir).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ndtrain.cluster.sink import MetricsSink, NullSink  # re-exported: the sink interface the trainer logs to
from ndtrain.data.atomic import DiskFullError, atomic_write_text, is_disk_full  # (re-exported: report tools write
# through rundir)

# The run directory's file names, defined here only (the table above says who writes each).
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TASK_INFO = "task_info.json"
TOKENIZER = "tokenizer.json"
TOPOLOGY = "topology.json"
RANKS = "ranks.json"  # the coordinator's per-rank table (distributed backends)
TB_DIR = "tb"
REPORT = "report.html"
PLOTS_DIR = "plots"
# everything a run writes into its directory: what --overwrite removes first
RUN_OUTPUTS = (CONFIG, METRICS, SUMMARY, CHECKPOINTS, TASK_INFO, TOKENIZER, TOPOLOGY, RANKS, TB_DIR, REPORT,
               PLOTS_DIR)
RUNS_ROOT = "runs"

SUMMARY_KEYS = ("steps", "wall_s", "final_loss", "eval")
TRAIN_KEYS = ("step", "loss", "lr", "time")


def _jsonable(x: Any) -> Any:
    """NumPy scalars -> Python; non-finite floats -> "nan"/"inf" strings (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "nan", "inf": visible, and still valid JSON
    return x


def write_json(out: str | os.PathLike, name: str, obj) -> Path:
    """DIR/name as indented JSON, atomically."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
    return path


def path_in(out: str | os.PathLike | None, name: str) -> Path | None:
    """DIR/name, or None without a run directory."""
    return None if out is None else Path(out) / name


def write_run_files(out: str | os.PathLike, info, tokenizer=None) -> None:
    """DIR/task_info.json (and DIR/tokenizer.json for text tasks): with config.toml and the checkpoints the run
    directory alone rebuilds the model (launch/restore.py reads them first), even after the data is gone."""
    write_json(out, TASK_INFO, info.to_dict())
    text = tokenizer.to_json() if tokenizer is not None else info.extra.get("tokenizer_json")
    if text:
        atomic_write_text(Path(out) / TOKENIZER, text)


class RunWriter(MetricsSink):
    """Writes DIR/metrics.jsonl and DIR/summary.json. `log` appends one line and flushes."""

    def __init__(self, out: str | os.PathLike, append: bool = False):
        if not str(out):
            raise ValueError("RunWriter: empty run directory (run.out); `ndtrain train` picks a fresh one")
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CHECKPOINTS).mkdir(exist_ok=True)
        self._f = open(self.dir / METRICS, "a" if append else "w")

    def log(self, record: dict) -> None:
        if "step" not in record:
            raise ValueError(f"{self.dir / METRICS}: every record needs a 'step'; got keys {sorted(record)}")
        line = json.dumps(_jsonable(record), separators=(",", ":")) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(self.dir / METRICS, len(line)) from None
            raise

    def summary(self, summary: dict) -> None:
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"{self.dir / SUMMARY}: summary lacks {missing}")
        atomic_write_text(self.dir / SUMMARY, json.dumps(_jsonable(summary), indent=2) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_metrics(out: str | os.PathLike, step: int) -> int:
    """Resuming from the checkpoint of `step`: drop the records of later steps (they will be written again), so
    the resumed run continues the same metrics.jsonl without duplicates. Atomic. Returns how many were dropped."""
    path = Path(out) / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                dropped += 1  # a line cut short by the crash
                continue
            if isinstance(rec_step, int) and rec_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


# -- where a run writes ----------------------------------------------------------------------------------------------
class RunDirError(ValueError):
    """The run directory cannot be used (not empty, not creatable, not writable); the message names it."""


def fresh_run_dir(task: str, model: str, root: str | os.PathLike = RUNS_ROOT, now: float | None = None) -> Path:
    """runs/<task>-<model>-<UTC timestamp>, with -2, -3, ... when that name is taken: never an existing directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    base = Path(root) / f"{task}-{model}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def check_run_dir_free(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that already holds files, unless the run resumes it or overwrites it. Nothing is
    changed here."""
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"run.out: {d} exists and is not a directory")
    if resume or overwrite or not d.is_dir():
        return
    try:
        entries = sorted(p.name for p in d.iterdir())
    except OSError as e:
        raise RunDirError(f"run.out: cannot read {d}: {e.strerror}") from None
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(f"run.out: {d} is not empty ({shown}); pass --resume {d} to continue that run, "
                          f"--overwrite to replace it, or another --out")


def clear_run_outputs(out: str | os.PathLike) -> list[str]:
    """--overwrite: remove every file and directory a run writes (RUN_OUTPUTS) from `out`; returns their names."""
    d = Path(out)
    removed = []
    for name in RUN_OUTPUTS:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_writable_dir(out: str | os.PathLike) -> None:
    """Prove before any worker starts that `out` can be created and written: a path that cannot be created
    (/proc/x, under a file) or a read-only directory is one RunDirError naming it, not a traceback mid-run. It
    really creates the missing directories and a probe file, then removes exactly what it created: a bad run
    leaves nothing behind."""
    d = Path(out)
    created = []
    missing = [p for p in [d, *d.parents] if not p.exists()]
    try:
        for p in reversed(missing):
            try:
                p.mkdir()
            except OSError as e:
                raise RunDirError(f"run.out: cannot create {d}: {e.strerror or e} ({p})") from None
            created.append(p)
        probe = d / f".ndtrain-write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
        except OSError as e:
            what = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else e.strerror
            raise RunDirError(f"run.out: cannot write in {d} ({what})") from None
        probe.unlink()
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass


# -- readers ---------------------------------------------------------------------------------------------------------
def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS


def read_metrics(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / METRICS
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON: {e}") from None
    return rows


def read_summary(out: str | os.PathLike) -> dict:
    with open(Path(out) / SUMMARY) as f:
        return json.load(f)


def train_events(rows: list[dict]) -> list[dict]:
    """The train records (neither evaluations nor events such as {"event": "straggler"} / "membership")."""
    return [r for r in rows if "eval" not in r and "event" not in r]


def run_events(rows: list[dict], kind: str) -> list[dict]:
    """The event records of one kind: "straggler" (cluster/straggler.py), "membership" (elastic Ray runs)."""
    return [r for r in rows if r.get("event") == kind]


def eval_events(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval" in r]
