"""`ndtrain config keys`: every configuration key with its type, default and one-line doc.

    ndtrain config keys                     # run.*, optim.*, data.*, cluster.*
    ndtrain config keys --model lm          # ... and the [model] keys of one family, with their defaults
    ndtrain config keys --json              # [{"key", "type", "default", "doc"}], for scripts

Any key is set with `ndtrain train --set KEY=VALUE` or in a TOML file's [section] (`--config FILE`);
`ndtrain train --help-config` prints the same listing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from ndtrain.launch.errors import UsageError
from ndtrain.launch.config import POSITIVE, SECTIONS, describe
from ndtrain.launch import models
from ndtrain.launch.suggest import did_you_mean
import importlib


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="list every configuration key (type, default, doc)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="config_command", metavar="ACTION")
    k = actions.add_parser("keys", help="every config key with its type, default and one-line doc")
    k.add_argument("--model", metavar="FAMILY", help="also list the [model] keys of this model family")
    k.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    k.set_defaults(func=run_keys)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _type_name(t) -> str:
    if typing.get_origin(t) is not None:
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", str(t))


def fixed_keys() -> list[dict]:
    """[{"key", "type", "default", "doc"}] of every field of the run/optim/data/cluster sections
    (launch.config.describe() with the annotation's type and the validation range added to the doc)."""
    meta = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta[f"{section}.{f.name}"] = (hints[f.name], f.metadata)
    rows = []
    for name, default, doc in describe():
        t, m = meta[name]
        limits = []
        if m.get("choices"):
            limits.append("one of " + ", ".join(map(str, m["choices"])))
        if m.get("min") is not None:
            limits.append("> 0" if m["min"] == POSITIVE else f">= {m['min']}")
        if m.get("max") is not None:
            limits.append(f"<= {m['max']}")
        doc = doc.strip()
        if limits:
            doc = f"{doc} [{'; '.join(limits)}]" if doc else f"[{'; '.join(limits)}]"
        rows.append({"key": name, "type": _type_name(t), "default": default, "doc": doc})
    return rows


def model_keys(family: str) -> list[dict]:
    """The [model] keys of one family with their defaults (the DEFAULTS table of the family's module)."""
    names = models.model_names()
    if family not in names:
        raise UsageError(f"--model: unknown model {family!r}{did_you_mean(family, names)}; known: {', '.join(names)}")
    builder = models._REGISTRY[family]
    defaults = getattr(importlib.import_module(builder.__module__), "DEFAULTS", {})
    if isinstance(defaults, dict) and isinstance(defaults.get(family), dict):
        defaults = defaults[family]  # one module, several families (transformer.py: transformer, lm, classifier)
    elif defaults and all(isinstance(v, dict) for v in defaults.values()):
        defaults = {}
    return [{"key": f"model.{k}", "type": type(v).__name__ if v is not None else "any", "default": v,
             "doc": f"{family} hyper-parameter"} for k, v in defaults.items()]


def format_table(rows: list[dict]) -> str:
    def show(v):
        return json.dumps(v) if not isinstance(v, str) else repr(v)
    w_key = max(len(r["key"]) for r in rows)
    w_type = max(len(r["type"]) for r in rows)
    w_def = min(24, max(len(show(r["default"])) for r in rows))
    out = [f"{'key'.ljust(w_key)}  {'type'.ljust(w_type)}  {'default'.ljust(w_def)}  doc"]
    for r in rows:
        out.append(f"{r['key'].ljust(w_key)}  {r['type'].ljust(w_type)}  {show(r['default']).ljust(w_def)}  "
                   f"{r['doc']}".rstrip())
    return "\n".join(out)


def print_keys(model: str | None = None, as_json: bool = False, file=None) -> None:
    rows = fixed_keys() + (model_keys(model) if model else [])
    file = file or sys.stdout
    if as_json:
        print(json.dumps(rows, indent=1), file=file)
    else:
        print(format_table(rows), file=file)
        if not model:
            print("\n[model] keys depend on the family: `ndtrain config keys --model NAME`.", file=file)


def run_keys(args) -> int:
    print_keys(args.model, args.json)
    return 0


class HelpConfigAction(argparse.Action):
    """`ndtrain train --help-config`: print every config key and exit (like --help)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print_keys()
        parser.exit(0)
