"""A training run from the driver's side, shared by `ndtrain train` and the Python API (`ndtrain.train`):
resolve the config, pass the validation gate, run the job on its backend, finish the run directory.

    cfg = resolve_config(task="xor", run={"steps": 600}, overrides=["optim.lr=0.05"])
    summary = train(cfg, Console(cfg.run.steps, quiet=True))      # TrainingFailed when a rank failed

Resolution order: defaults < the task's preset configs/<task>.toml (or --config FILE, or the config.toml of the run
directory being resumed) < run.* values (the CLI's flags) < `section.key=value` overrides.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tomllib
from pathlib import Path

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster import interrupt
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.nonfinite import WorkerError
from ndtrain.cluster.supervise import Topology, local_host
from ndtrain.data.atomic import DiskFullError
from ndtrain.launch import launch_mpi, launch_ray, rundir
from ndtrain.launch.config import Config, ConfigError, apply_overrides, load_config, merge_dict
from ndtrain.launch.errors import UsageError
from ndtrain.launch.gate import check_config
from ndtrain.launch.presets import preset_path
from ndtrain.launch.progress import Console, format_done
from ndtrain.launch.report import write_report
from ndtrain.launch.worker import resolved_threads, run_worker

LAUNCHERS = {"mpi": launch_mpi, "ray": launch_ray}  # run.backend -> the module whose launch(cfg, console) runs it


class TrainingFailed(RuntimeError):
    """A distributed job ended without finishing (the coordinator printed which rank failed and why). exit_code: 2
    when a rank stopped for a reason it named in one line (non-finite steps, a full disk), else 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(RuntimeError):
    """Ctrl-C / SIGTERM stopped the run at a step boundary, with a checkpoint (cluster/interrupt.py); the
    `interrupted at step N; resume with ...` line is printed. exit_code: 128 + the signal."""

    def __init__(self, step: int | None, run_dir: str):
        super().__init__(f"interrupted at step {step}; resume with: ndtrain train --resume {run_dir}")
        self.step, self.run_dir, self.exit_code = step, run_dir, interrupt.exit_code()


def run_dir_of(resume: str | None) -> Path | None:
    """The run directory `--resume` names (one holding config.toml and checkpoints/), else None."""
    if resume and (Path(resume) / rundir.CONFIG).is_file() and rundir.checkpoints_dir(resume).is_dir():
        return Path(resume)
    return None


def resolve_config(*, config: str | None = None, task: str | None = None, model: str | None = None,
                   run: dict | None = None, keys: dict | None = None, cluster: dict | None = None,
                   overrides=()) -> Config:
    """The run's config (see the module docstring); not validated yet (the gate does it). run: run.* values
    (None values are ignored; run["resume"] may name a run directory, whose config.toml is then the base);
    keys: {"section.key": value} of the flags named after other trainers' (--data, --lr), applied before
    `overrides`."""
    cfg = Config()
    run = {k: v for k, v in (run or {}).items() if v is not None}
    resumed_dir = run_dir_of(run.get("resume"))
    if config:
        cfg = load_config(config, cfg)
    elif resumed_dir is not None:
        cfg = load_config(resumed_dir / rundir.CONFIG, cfg)  # the run's own config; flags and --set still apply
        run.setdefault("out", str(resumed_dir))
    else:
        preset = preset_path(task or cfg.run.task)
        if preset is not None:
            with open(preset, "rb") as f:
                data = tomllib.load(f)
            if model and model != data.get("run", {}).get("model", cfg.run.model):
                data.pop("model", None)  # that table tunes another family
            merge_dict(cfg, data, source=f" (in {preset})")
    for name, value in (("task", task), ("model", model)):
        if value is not None:
            run[name] = value
    for name, value in run.items():
        merge_dict(cfg, {"run": {name: value}}, source=f" (from --{name.replace('_', '-')})")
    for key, value in (keys or {}).items():
        if value is not None:
            section, name = key.split(".")
            flag = {"data.dir": "data", "optim.lr": "lr"}.get(key, name.replace("_", "-"))
            merge_dict(cfg, {section: {name: value}}, source=f" (from --{flag})")
    for name, value in (cluster or {}).items():
        if value is not None:
            merge_dict(cfg, {"cluster": {name: value}}, source=f" (from --{name})")
    apply_overrides(cfg, list(overrides))
    return cfg


def local_topology(cfg: Config) -> Topology:
    """The launchers' Topology (cluster/supervise.py) of a local run: one rank on this host."""
    return Topology("local", [local_host()], 1, resolved_threads(cfg), cfg.run.batch_size)


def prepare_run_dir(cfg: Config, overwrite: bool) -> None:
    """The run directory, before anything is written: refuse a non-empty one (unless resuming or overwrite),
    prove it can be created and written; overwrite then removes what an earlier run left (launch/rundir.py)."""
    if overwrite and cfg.run.resume:
        raise ConfigError("--overwrite: cannot be combined with --resume (it would delete the run being resumed)")
    try:
        rundir.check_run_dir_free(cfg.run.out, resume=bool(cfg.run.resume), overwrite=overwrite)
        rundir.check_writable_dir(cfg.run.out)
        if overwrite:
            rundir.clear_run_outputs(cfg.run.out)
    except (rundir.RunDirError, OSError) as e:
        raise ConfigError(str(e) if isinstance(e, rundir.RunDirError) else f"run.out: {cfg.run.out}: {e}") from None


def train(cfg: Config, console: Console, overwrite: bool = False, signals: bool = False) -> dict:
    """Gate, run, finish: returns the summary. UsageError for a user mistake (before anything runs) or a run that
    stopped for a reason it names (non-finite steps, a full disk), TrainingFailed when a distributed job failed
    (its message is on stderr already), TrainingStopped when Ctrl-C / SIGTERM stopped it with a checkpoint.
    overwrite: clear a non-empty run directory first (else it is refused). signals: this process (the main thread
    of `ndtrain train`) turns Ctrl-C / SIGTERM into a stop at the next step boundary (cluster/interrupt.py) once
    the gate has passed."""
    if not cfg.run.out:  # no --out: a fresh directory, never an earlier run's
        cfg.run.out = str(rundir.fresh_run_dir(cfg.run.task, cfg.run.model))
    job, data = check_config(cfg)
    prepare_run_dir(cfg, overwrite)
    with interrupt.handle_signals() if signals else contextlib.nullcontext():
        summary = _run(cfg, console, job, data)
    if console.json:
        console.emit("done", {**summary, "run_dir": cfg.run.out})
    else:  # --quiet too: it silences progress, not the result
        print(format_done(summary, cfg.run.out), flush=True)
    finish_report(cfg, console)
    return summary


def _run(cfg: Config, console: Console, job, data) -> dict:
    """The job on its backend; the summary of a finished run."""
    if cfg.run.backend == "local":
        def on_ready(trainer) -> None:
            topo = local_topology(cfg)
            print(topo.line(), file=sys.stderr, flush=True)  # as launch_mpi / launch_ray print it
            rundir.write_json(cfg.run.out, rundir.TOPOLOGY, topo.to_dict())
            console.emit("topology", topo.to_dict())

        try:
            summary = run_worker(cfg, LocalCommunicator(), write_config=True, console=console, on_ready=on_ready,
                                 job=job, data=data)
        except interrupt.Interrupted as e:
            print(interrupt.interrupted_line(e.step, cfg.run.out), file=sys.stderr, flush=True)
            raise _stopped(console, e.step, cfg.run.out) from None
        except (WorkerError, DiskFullError) as e:  # the run stopped for a reason it names (rank, step / path)
            raise UsageError(str(e)) from None
    else:
        if cfg.run.resume:
            rundir.truncate_metrics(cfg.run.out, job.start_step)  # records after the checkpoint are replayed
        del job, data  # the ranks build their own
        rc = int(LAUNCHERS[cfg.run.backend].launch(cfg, console) or 0)
        if rc > 128:  # stopped on request; the launcher printed where to resume from
            newest = ckpt.latest(rundir.checkpoints_dir(cfg.run.out))
            raise _stopped(console, int(newest.stem.split("-")[1]) if newest is not None else None, cfg.run.out)
        if rc != 0:
            raise TrainingFailed(f"the {cfg.run.backend} job failed (exit status {rc})", exit_code=2 if rc == 2 else 1)
        summary = rundir.read_summary(cfg.run.out)
        record_link(cfg.run.out, summary)
    return summary


def record_link(out, summary: dict) -> None:
    """topology.json (written before the ranks started) gets the link they measured at start-up (summary's link:
    cluster/link_probe.py), so the topology says how fast its hosts talk."""
    link = summary.get("link") if isinstance(summary, dict) else None
    path = Path(out) / rundir.TOPOLOGY
    if not isinstance(link, dict) or not path.exists():
        return
    try:
        topo = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(topo, dict):
        rundir.write_json(out, rundir.TOPOLOGY, {**topo, "link": link})


def _stopped(console: Console, step: int | None, out: str) -> TrainingStopped:
    if console.json:
        console.emit("interrupted", {"step": step, "run_dir": out})
    return TrainingStopped(step, out)


def report_enabled(cfg: Config) -> bool:
    return bool(cfg.run.report) and os.environ.get("NDTRAIN_REPORT", "1") != "0"


def finish_report(cfg: Config, console=None) -> Path | None:
    """report.html of a finished run (launch/report; never raises: a plotting problem is one line on stderr)."""
    if not report_enabled(cfg):
        return None
    path = write_report(cfg.run.out)
    if path is not None and console is not None:
        if console.json:
            console.emit("report", {"path": str(path)})
        elif not console.quiet:
            print(f"report: {path}", flush=True)
    return path


__all__ = ["resolve_config", "train", "TrainingFailed", "TrainingStopped", "preset_path", "finish_report", "UsageError"]
