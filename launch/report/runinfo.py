"""What one run directory says about itself: task, model, progress, final metrics, wall time and status.

    facts = run_facts("runs/reverse")     # RunFacts
    find_runs("runs")                     # the run directories under runs/ (two levels deep)

Status, from the files a run leaves (launch/rundir.py):
    finished      summary.json is there and its step count reaches the config's run.steps
    failed        not finished, and metrics.jsonl holds an error record (a rank raised; the worker or the
                  coordinator logged it)
    interrupted   neither: the run stopped (Ctrl-C, a kill, a lost machine) or is still going; `resumable from step
                  N` when a checkpoint is there (`ndtrain train --resume DIR`)
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ndtrain.launch import rundir


@dataclass
class RunFacts:
    path: Path
    task: str = "?"
    model: str = "?"
    steps_done: int = 0
    steps_total: int | None = None
    final_loss: float | None = None
    final_eval: dict = field(default_factory=dict)
    wall_s: float | None = None
    status: str = "interrupted"
    note: str = ""  # "resumable from step 400", the error text, ...
    config: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # metrics.jsonl records
    membership_changes: int | None = None  # workers that left or joined (elastic Ray runs; summary.json)
    stragglers: int | None = None  # straggler episodes named (MPI / Ray runs of W > 1; summary.json)

    @property
    def name(self) -> str:
        return self.path.name


def is_run_dir(d: Path) -> bool:
    return (d / rundir.CONFIG).is_file() or (d / rundir.METRICS).is_file()


def find_runs(root: str | Path) -> list[Path]:
    """root itself when it is a run directory, else the run directories one or two levels below it, sorted."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if is_run_dir(d):
            found.append(d)
        else:
            found += [s for s in sorted(p for p in d.iterdir() if p.is_dir()) if is_run_dir(s)]
    return found


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _newest_checkpoint_step(d: Path) -> int | None:
    steps = []
    for p in (d / rundir.CHECKPOINTS).glob("ckpt-*.json") if (d / rundir.CHECKPOINTS).is_dir() else []:
        try:
            steps.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            continue
    return max(steps) if steps else None


def run_facts(path: str | Path) -> RunFacts:
    """Everything `ndtrain runs` and the comparison page show about one run (never raises for a damaged run:
    what cannot be read is left out and said in `note`)."""
    d = Path(path)
    f = RunFacts(d)
    try:
        with open(d / rundir.CONFIG, "rb") as fh:
            f.config = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        f.config = {}
    run = f.config.get("run", {})
    f.task, f.model = run.get("task", "?"), run.get("model", "?")
    f.steps_total = run.get("steps")
    try:
        f.rows = rundir.read_metrics(d) if (d / rundir.METRICS).is_file() else []
    except ValueError as e:
        f.rows, f.note = [], str(e)
    train = [r for r in rundir.train_events(f.rows) if "error" not in r and "loss" in r]
    evals = [r for r in rundir.eval_events(f.rows) if isinstance(r.get("eval"), dict)]
    steps = [r["step"] for r in f.rows if isinstance(r.get("step"), int)]
    f.steps_done = max(steps, default=0)
    times = [r["time"] for r in f.rows if isinstance(r.get("time"), (int, float))]
    f.wall_s = max(times) if times else None
    if train:
        f.final_loss = train[-1].get("loss")
    if evals:
        f.final_eval = dict(evals[-1]["eval"])
    summary = _read_json(d / rundir.SUMMARY)
    errors = [r for r in f.rows if "error" in r]
    if isinstance(summary, dict):
        f.task, f.model = summary.get("task", f.task), summary.get("model", f.model)
        f.steps_done = int(summary.get("steps", f.steps_done))
        f.wall_s = summary.get("wall_s", f.wall_s)
        f.final_loss = summary.get("final_loss", f.final_loss)
        if isinstance(summary.get("eval"), dict):
            f.final_eval = summary["eval"]
        if isinstance(summary.get("membership_changes"), int):
            f.membership_changes = summary["membership_changes"]
        if isinstance(summary.get("stragglers"), list):
            f.stragglers = len(summary["stragglers"])
    if isinstance(summary, dict) and (f.steps_total is None or f.steps_done >= f.steps_total):
        f.status = "finished"  # also when an earlier attempt failed and a resume completed the run
    elif errors:
        f.status = "failed"
        e = errors[-1]
        f.note = f"step {e.get('step')}" + (f", rank {e['rank']}" if "rank" in e else "") + f": {e['error']}"
    else:
        f.status = "interrupted"
        ck = _newest_checkpoint_step(d)
        f.note = f"resumable from step {ck}" if ck is not None else "no checkpoint"
    return f


__all__ = ["RunFacts", "run_facts", "find_runs", "is_run_dir"]
