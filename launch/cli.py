"""`ndtrain` command line. Each sub-command is a module `ndtrain.launch.cmd_<name>` with
`add_parser(subparsers)` (registers its parser and sets `func`) — adding a command never edits this file's logic.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from ndtrain.cluster import interrupt
from ndtrain.launch.errors import UsageError  # re-exported: commands raise it, main() turns it into exit 2

COMMANDS = ["train", "worker", "data", "eval", "generate", "average", "report", "runs", "config", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ndtrain", description="Distributed training with a pure-NumPy engine.")
    parser.add_argument("--version", action="version", version=f"ndtrain {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ndtrain.launch.cmd_{name}").add_parser(sub)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml), or 'unknown' outside an install."""
    try:
        return dist_version("ndtrain")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"ndtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside (cluster/interrupt.py)
        print(f"ndtrain {args.command}: aborted", file=sys.stderr, flush=True)
        return interrupt.exit_code()


if __name__ == "__main__":
    # `python -m ndtrain.launch.cli` runs this file as __main__, a second copy of the module: call the canonical
    # one so the UsageError other modules raise is the class caught here (exit 2, not a traceback).
    from ndtrain.launch.cli import main as _main
    sys.exit(_main())
