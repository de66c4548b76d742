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
import sys

import tomli_w

from ndtrain.launch import training
from ndtrain.launch.cmd_config import HelpConfigAction
from ndtrain.launch.config import Config
from ndtrain.launch.gate import check_names
from ndtrain.launch.presets import preset_path  # noqa: F401  (re-exported: tests and tools look presets up here)
from ndtrain.launch.progress import Console

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
    p.add_argument("--min-workers", type=int, metavar="N",
                   help="Ray: continue with as few as N workers when workers leave (cluster.min_workers; "
                        "docs/elastic.md)")
    p.add_argument("--max-workers", type=int, metavar="M",
                   help="Ray: grow up to M workers when capacity appears (cluster.max_workers)")
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
    p.add_argument("--help-config", action=HelpConfigAction,
                   help="list every config key (type, default, doc) and exit; see also `ndtrain config keys`")
    p.add_argument("--hostfile", help="MPI hostfile (backend mpi)")
    p.add_argument("--address", help="Ray address (backend ray)")
    p.add_argument("--iface", help="network interface between hosts, e.g. eth1 (cluster.iface; docs/security.md)")
    p.add_argument("--compress", choices=("fp16", "bf16", "powersgd"),
                   help="gradient compression with error feedback (cluster.compress; docs/network.md)")
    p.add_argument("--sync-every", type=int, metavar="H",
                   help="DiLoCo: H local steps per rank between parameter all-reduces (cluster.sync_every)")
    p.add_argument("--sync-overlap", action="store_true", default=None,
                   help="DiLoCo: exchange the outer gradient while the next H steps run (cluster.sync_overlap)")
    p.add_argument("--outer-lr", type=float, metavar="LR",
                   help="DiLoCo's outer learning rate (cluster.outer_lr, default 0.7; 1 with --outer-momentum 0: "
                        "local SGD, the parameters averaged)")
    p.add_argument("--outer-momentum", type=float, metavar="MU",
                   help="DiLoCo's outer Nesterov momentum (cluster.outer_momentum, default 0.9)")
    p.add_argument("--sync-delay", type=int, metavar="TAU",
                   help="DiLoCo overlapped: apply each outer step TAU inner steps after its exchange starts "
                        "(cluster.sync_delay; default H)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text (default) or json: one JSON object per event on stdout, for scripts and CI")
    p.add_argument("--no-report", action="store_true", help="skip report.html at the end (run.report=false)")
    p.set_defaults(func=main)


def resolve_config(args) -> Config:
    """The config the command line describes (launch/training.py: defaults < preset / --config / the resumed run's
    config.toml < flags < --set)."""
    run = {name: getattr(args, flag, None) for flag, name in RUN_FLAGS.items() if flag not in ("task", "model")}
    if getattr(args, "no_report", False):
        run["report"] = False
    keys = {key: getattr(args, flag, None) for flag, key in KEY_FLAGS.items()}
    return training.resolve_config(config=args.config, task=args.task, model=args.model, run=run, keys=keys,
                                   cluster={"hostfile": getattr(args, "hostfile", None),
                                            "address": getattr(args, "address", None),
                                            "iface": getattr(args, "iface", None),
                                            "compress": getattr(args, "compress", None),
                                            "sync_every": getattr(args, "sync_every", None),
                                            "sync_overlap": getattr(args, "sync_overlap", None),
                                            "sync_delay": getattr(args, "sync_delay", None),
                                            "outer_lr": getattr(args, "outer_lr", None),
                                            "outer_momentum": getattr(args, "outer_momentum", None),
                                            "min_workers": getattr(args, "min_workers", None),
                                            "max_workers": getattr(args, "max_workers", None)},
                                   overrides=args.overrides)


def main(args) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        check_names(cfg)  # field values and names; nothing is loaded
        sys.stdout.write(tomli_w.dumps(cfg.to_dict()))
        return 0
    console = Console(cfg.run.steps, getattr(args, "log_format", "text") or "text", quiet=args.quiet)
    try:
        training.train(cfg, console, overwrite=bool(getattr(args, "overwrite", False)), signals=True)
    except training.TrainingStopped as e:
        return e.exit_code  # 128 + signal; the `interrupted at step N; resume with ...` line is printed
    except training.TrainingFailed as e:
        return e.exit_code  # the coordinator has said which rank failed (and, for exit 1, how to resume)
    return 0
