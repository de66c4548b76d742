"""`ndtrain train`: resolve the config (defaults < task preset or --config < flags < --set), validate it, run.

    ndtrain train --task xor --model mlp --backend local --steps 600 --out runs/xor
    ndtrain train --config configs/digits.toml --set optim.lr=3e-3 --set model.hidden=[128]

`--batch-size` is the GLOBAL batch: `--backend mpi --workers 4` trains exactly what `--backend local` trains.
Without --config, the preset configs/<task>.toml (if any) supplies the task's tuned hyper-parameters; its [model]
table applies only when the model matches.

    ndtrain train --resume runs/x                  # continue run x: its config.toml, its directory, its metrics
    ndtrain train --resume runs/x --workers 1 --backend local      # ... on another number of workers

--resume takes a run directory, a checkpoints directory (the newest checkpoint that verifies; a corrupt newer one
is skipped with a warning) or one checkpoint JSON (which must verify). The checkpoint is resolved and checked here,
before any worker starts; metrics recorded after its step are dropped, so metrics.jsonl continues without repeats.

What a run shows and leaves (every backend): the topology line on stderr at start (backend, ranks, BLAS threads
per rank, global = per-rank batch); progress (a live line on a terminal, plain lines in logs, none with --quiet,
or `--log-format json`: one JSON object per event on stdout, see launch/progress.py); in the run directory
config.toml, task_info.json (+ tokenizer.json), metrics.jsonl, summary.json, checkpoints/, tb/ (TensorBoard;
run.tensorboard) and, once training succeeded, report.html (run.report, or --no-report).
For test suites: NDTRAIN_REPORT=0 and NDTRAIN_TENSORBOARD=0 in the environment turn the last two off.

Ctrl-C or SIGTERM (every backend) stops at the next step boundary, writes a checkpoint, prints `interrupted at step
N; resume with: ndtrain train --resume DIR` and exits 130 (SIGINT) or 143 (SIGTERM); a second Ctrl-C aborts at
once (cluster/interrupt.py).

    ndtrain train --task xor --print-config        # the resolved config as TOML, nothing run
    ndtrain train --task xor --log-format json | jq -c 'select(.event == "train") | [.step, .loss]'
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from ndtrain.cluster import interrupt
from ndtrain.launch.cli import UsageError
from ndtrain.launch.config import Config, ConfigError, apply_overrides, load_config, merge_dict, validate

# flag -> run.<field>
RUN_FLAGS = {"task": "task", "model": "model", "steps": "steps", "out": "out", "batch_size": "batch_size",
             "seed": "seed", "checkpoint_every": "checkpoint_every", "backend": "backend", "workers": "workers",
             "threads": "threads", "resume": "resume"}
# flag -> section.key: the names people reach for from other trainers (applied before --set, like RUN_FLAGS)
KEY_FLAGS = {"data": "data.dir", "lr": "optim.lr", "eval_every": "run.eval_every", "log_every": "run.log_every"}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (local, MPI or Ray backend)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help="built-in task (xor, spirals, sine, digits, copy, reverse, sort, add, dates) or a "
                                  "preset for your own data with --data (shakespeare, multi30k)")
    p.add_argument("--model", help="model family (mlp, transformer, lm, ...)")
    p.add_argument("--data", metavar="DIR", help="prepared shards (DIR/train, DIR/val from `ndtrain data`); "
                                                 "the same as --set data.dir=DIR")
    p.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations (run.eval_every; 0: at "
                                                                "the end only)")
    p.add_argument("--log-every", type=int, metavar="N", help="steps between metrics records (run.log_every)")
    p.add_argument("--backend", choices=("local", "mpi", "ray"), help="where workers run (default local)")
    p.add_argument("--workers", type=int, help="number of workers (mpi, ray)")
    p.add_argument("--threads", type=int, help="BLAS threads per worker (default cores // workers)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--out", help="run directory")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (split across workers)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--resume", help="checkpoint JSON (or checkpoints directory) to resume from")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --out: first remove the files an earlier run left there "
                        "(checkpoints, metrics, tb/, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.lr=3e-3 or model.hidden=[64,64] (repeatable)")
    p.add_argument("--config", help="a TOML config file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    from ndtrain.launch.cmd_config import HelpConfigAction
    p.add_argument("--help-config", action=HelpConfigAction,
                   help="list every config key (type, default, doc) and exit; see also `ndtrain config keys`")
    p.add_argument("--hostfile", help="MPI hostfile (backend mpi)")
    p.add_argument("--address", help="Ray address (backend ray)")
    p.add_argument("--iface", help="network interface between hosts, e.g. eth1 (cluster.iface; docs/security.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text (default) or json: one JSON object per event on stdout, for scripts and CI")
    p.add_argument("--no-report", action="store_true", help="skip report.html at the end (run.report=false)")
    p.set_defaults(func=main)


def preset_path(task: str) -> Path | None:
    """configs/<task>.toml beside the package (editable install) or inside it (launch/configs)."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "configs", here / "configs"):
        if (d / f"{task}.toml").is_file():
            return d / f"{task}.toml"
    return None


def run_dir_of(resume: str | None) -> Path | None:
    """The run directory `--resume` names (one holding config.toml and checkpoints/), else None."""
    if resume and (Path(resume) / "config.toml").is_file() and (Path(resume) / "checkpoints").is_dir():
        return Path(resume)
    return None


def resolve_config(args) -> Config:
    cfg = Config()
    resumed_dir = run_dir_of(getattr(args, "resume", None))
    if args.config:
        cfg = load_config(args.config, cfg)
    elif resumed_dir is not None:
        cfg = load_config(resumed_dir / "config.toml", cfg)  # the run's own config; flags and --set still apply
        if args.out is None:
            cfg.run.out = str(resumed_dir)
    else:
        task = args.task or cfg.run.task
        preset = preset_path(task)
        if preset is not None:
            import tomllib
            with open(preset, "rb") as f:
                data = tomllib.load(f)
            preset_model = data.get("run", {}).get("model", cfg.run.model)
            if args.model and args.model != preset_model:
                data.pop("model", None)  # that table tunes another family
            merge_dict(cfg, data, source=f" (in {preset})")
    for flag, name in RUN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            merge_dict(cfg, {"run": {name: value}}, source=f" (from --{flag.replace('_', '-')})")
    for flag, key in KEY_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            section, name = key.split(".")
            merge_dict(cfg, {section: {name: value}}, source=f" (from --{flag.replace('_', '-')})")
    if getattr(args, "hostfile", None):
        cfg.cluster.hostfile = args.hostfile
    if getattr(args, "address", None):
        cfg.cluster.address = args.address
    if getattr(args, "iface", None):
        cfg.cluster.iface = args.iface
    if getattr(args, "no_report", False):
        cfg.run.report = False
    apply_overrides(cfg, args.overrides)
    if not cfg.run.out:  # no --out: a fresh directory, never an earlier run's
        from ndtrain.launch.rundir import fresh_run_dir
        cfg.run.out = str(fresh_run_dir(cfg.run.task, cfg.run.model))
    validate(cfg)
    check_names(cfg)
    return cfg


def resolve_resume(cfg: Config) -> None:
    """run.resume -> the checkpoint JSON that will be used (verified now, before any process starts); warnings
    for skipped corrupt checkpoints go to stderr. Drops metrics records after the checkpoint's step."""
    import warnings
    from ndtrain.cluster import checkpoint as ckpt
    from ndtrain.launch.rundir import truncate_metrics
    if not cfg.run.resume:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ckpt.CheckpointWarning)
        try:
            c = ckpt.load_valid(cfg.run.resume)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"run.resume: {e}") from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
    if c.step >= cfg.run.steps:
        raise ConfigError(f"run.steps: the checkpoint {c.path} is at step {c.step}; run.steps ({cfg.run.steps}) "
                          f"must be larger to continue")
    cfg.run.resume = str(c.path.resolve())
    truncate_metrics(cfg.run.out, c.step)


def prepare_run_dir(cfg: Config, overwrite: bool) -> None:
    """The run directory, before anything is written: refuse a non-empty one (unless resuming or --overwrite),
    prove it can be created and written; --overwrite then removes what an earlier run left (launch/rundir.py)."""
    from ndtrain.launch.rundir import RunDirError, check_run_dir_free, check_writable_dir, clear_run_outputs
    if overwrite and cfg.run.resume:
        raise ConfigError("--overwrite: cannot be combined with --resume (it would delete the run being resumed)")
    try:
        check_run_dir_free(cfg.run.out, resume=bool(cfg.run.resume), overwrite=overwrite)
        check_writable_dir(cfg.run.out)
        if overwrite:
            clear_run_outputs(cfg.run.out)
    except (RunDirError, OSError) as e:
        raise ConfigError(str(e) if isinstance(e, RunDirError) else f"run.out: {cfg.run.out}: {e}") from None


def check_names(cfg: Config) -> None:
    """Unknown task or model: a one-line error before anything runs."""
    from ndtrain.launch.models import model_names
    from ndtrain.launch.suggest import did_you_mean
    if not cfg.data.dir:
        from ndtrain.data import tasks
        if cfg.run.task not in tasks.TASKS:
            hint = did_you_mean(cfg.run.task, [*tasks.TASKS, *preset_names()])
            raise ConfigError(f"run.task: unknown task {cfg.run.task!r}{hint}; built-in tasks: "
                              f"{', '.join(tasks.TASKS)}; presets for your own data (with --data DIR): "
                              f"{', '.join(n for n in preset_names() if n not in tasks.TASKS)}")
    if cfg.data.dir and not (Path(cfg.data.dir) / "train").is_dir():  # before any rank starts
        raise ConfigError(f"data.dir: {cfg.data.dir}/train: no such data directory (give --data DIR, made by "
                          f"`ndtrain data import ... --val-fraction F --out DIR` or `ndtrain data prepare`)")
    names = model_names()
    if cfg.run.model not in names:
        raise ConfigError(f"run.model: unknown model {cfg.run.model!r}{did_you_mean(cfg.run.model, names)}; "
                          f"known: {', '.join(names)}")


def preset_names() -> list[str]:
    """The task presets beside the package: configs/<name>.toml."""
    here = Path(__file__).resolve().parent
    return sorted({p.stem for d in (here.parent / "configs", here / "configs") if d.is_dir()
                   for p in d.glob("*.toml")})


def _distributed_launcher(backend: str):
    """The launcher module of a distributed backend, or None when it is not built yet."""
    for mod in (f"ndtrain.launch.launch_{backend}", f"ndtrain.launch.{backend}_launcher"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if hasattr(m, "launch"):
            return m
    return None


def local_topology(cfg: Config):
    """The launchers' Topology (cluster/supervise.py) of a local run: one rank on this host."""
    from ndtrain.cluster.supervise import Topology, local_host
    from ndtrain.cluster.worker import resolved_threads
    return Topology("local", [local_host()], 1, resolved_threads(cfg), cfg.run.batch_size)


def report_enabled(cfg: Config) -> bool:
    return bool(cfg.run.report) and os.environ.get("NDTRAIN_REPORT", "1") != "0"


def finish_report(cfg: Config, console=None) -> Path | None:
    """report.html of a finished run (launch/report; never raises: a plotting problem is one line on stderr)."""
    if not report_enabled(cfg):
        return None
    from ndtrain.launch.report import write_report
    path = write_report(cfg.run.out)
    if path is not None and console is not None:
        if console.json:
            console.emit("report", {"path": str(path)})
        elif not console.quiet:
            print(f"report: {path}", flush=True)
    return path


def main(args) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        import tomli_w
        sys.stdout.write(tomli_w.dumps(cfg.to_dict()))
        return 0
    prepare_run_dir(cfg, bool(getattr(args, "overwrite", False)))
    resolve_resume(cfg)
    with interrupt.handle_signals():
        return _train(cfg, args)


def _interrupted(console, step: int | None, out: str) -> int:
    """The end of a run stopped on request (the launchers print the line themselves): exit 128 + signal."""
    if console.json:
        console.emit("interrupted", {"step": step, "run_dir": out})
    return interrupt.exit_code()


def _train(cfg: Config, args) -> int:
    from ndtrain.launch.progress import Console
    log_format = getattr(args, "log_format", "text") or "text"
    console = Console(cfg.run.steps, log_format, quiet=args.quiet)
    if cfg.run.backend != "local":
        launcher = _distributed_launcher(cfg.run.backend)
        if launcher is None:
            raise UsageError(f"run.backend: the {cfg.run.backend} backend is not available yet in this build "
                             f"(use --backend local)")
        rc = int(launcher.launch(cfg, quiet=args.quiet, log_format=log_format) or 0)
        if rc > 128:  # stopped on request; the launcher printed where to resume from
            from ndtrain.cluster import checkpoint as ckpt  # only needed here: numpy stays out of CLI start-up
            newest = ckpt.latest(Path(cfg.run.out) / "checkpoints")
            step = int(newest.stem.split("-")[1]) if newest is not None else None
            return _interrupted(console, step, cfg.run.out)
        if rc == 0:  # the driver, after the job ended well: the run directory is complete
            if console.json:
                from ndtrain.launch.rundir import read_summary
                console.emit("done", {**read_summary(cfg.run.out), "run_dir": cfg.run.out})
            finish_report(cfg, console)
        return rc
    from ndtrain.cluster.comm.local import LocalCommunicator
    from ndtrain.cluster.worker import WorkerError, run_worker
    from ndtrain.data.atomic import DiskFullError

    def on_ready(trainer) -> None:
        from ndtrain.data.atomic import atomic_write_text
        topo = local_topology(cfg)
        print(topo.line(), file=sys.stderr, flush=True)  # as launch_mpi / launch_ray print it
        atomic_write_text(Path(cfg.run.out) / "topology.json", json.dumps(topo.to_dict(), indent=1) + "\n")
        console.emit("topology", topo.to_dict())

    try:
        summary = run_worker(cfg, LocalCommunicator(), write_config=True, console=console, on_ready=on_ready)
    except interrupt.Interrupted as e:
        print(interrupt.interrupted_line(e.step, cfg.run.out), file=sys.stderr, flush=True)
        return _interrupted(console, e.step, cfg.run.out)
    except (WorkerError, DiskFullError) as e:  # the run stopped for a reason it names (rank, step / path): one line
        raise UsageError(str(e)) from None
    if console.json:
        console.emit("done", {**summary, "run_dir": cfg.run.out})
    else:
        ev = " ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items())
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.1f}s; final loss {summary['final_loss']:.4f}; "
              f"eval {ev}; run directory {cfg.run.out}")
    finish_report(cfg, console)
    return 0
