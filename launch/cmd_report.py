"""`ndtrain report`: plots and a self-contained HTML page for a run directory.

    ndtrain report --run runs/reverse       # -> runs/reverse/report.html, runs/reverse/plots/*.png

The page holds the summary and final evaluation, PNG plots of metrics.jsonl (train/val loss, validation metrics,
learning rate, throughput, gradient norm, step time, per rank when the records have it), an attention heat map
for seq2seq Transformers (one validation example), the topology of a distributed run and the config. Images are
inlined (base64), so the one file is the whole report. `ndtrain train` writes it at the end of a run too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ndtrain.launch.cli import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plots and an HTML report of a run directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (written by ndtrain train)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention heat map")
    p.add_argument("--no-samples", action="store_true", help="skip the text samples (greedy decoding at report time)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ndtrain.launch import rundir
    from ndtrain.launch.report import REPORT, build_report
    d = Path(args.run)
    if not d.is_dir():
        raise UsageError(f"{d}: no such run directory")
    if not (d / rundir.METRICS).is_file() and not (d / rundir.CONFIG).is_file():
        raise UsageError(f"{d}: neither {rundir.METRICS} nor {rundir.CONFIG} here - not a run directory written "
                         f"by `ndtrain train`")
    try:
        text = build_report(d, attention=not args.no_attention, samples=not args.no_samples)
    except ValueError as e:  # an unreadable metrics.jsonl line names the file and line
        raise UsageError(str(e)) from None
    rundir.atomic_write_text(d / REPORT, text)
    print(f"wrote {d / REPORT} ({len(text) // 1024} KiB)")
    return 0
