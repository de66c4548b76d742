"""`ndtrain bench NAME [args]`: runs benchmark module ndtrain.launch.bench.NAME, which exposes
`add_arguments(parser)` and `main(args) -> int`. Its arguments follow NAME (`ndtrain bench engine --threads 1`)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil

from .cli import UsageError
from . import bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark: ndtrain bench NAME [args] (NAME: engine, ...)",
                              description="Benchmarks; `ndtrain bench NAME --help` lists NAME's arguments.")
    p.add_argument("name", help="benchmark module under ndtrain.launch.bench")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    p.set_defaults(func=run)


def run(args) -> int:
    names = available()
    if args.name not in names:
        raise UsageError(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}")
    mod = importlib.import_module(f"ndtrain.launch.bench.{args.name}")
    parser = argparse.ArgumentParser(prog=f"ndtrain bench {args.name}", description=mod.__doc__.split("\n\n")[0])
    mod.add_arguments(parser)
    return int(mod.main(parser.parse_args(args.args)) or 0)
