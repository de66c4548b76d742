"""`ndtrain report`: plots and a self-contained HTML page for a run directory, or one page comparing runs.

    ndtrain report --run runs/reverse       # -> runs/reverse/report.html, runs/reverse/plots/*.png
    ndtrain report --run runs/a --run runs/b --out compare.html      # several runs on one page

A comparison page overlays the runs' curves (training loss, every validation metric, throughput; each against the
step and against wall-clock time), tabulates their final metrics and status, and lists the config keys that differ.
Without --out it is written to compare.html in the runs' common parent directory.

The page holds the summary and final evaluation, PNG plots of metrics.jsonl (train/val loss, validation metrics,
learning rate, throughput, gradient norm, step time, per rank when the records have it), an attention heat map
for seq2seq Transformers (one validation example), the topology of a distributed run and the config. Images are
inlined (base64), so the one file is the whole report. `ndtrain train` writes it at the end of a run too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ndtrain.launch.errors import UsageError
from ndtrain.launch import rundir
from ndtrain.launch.report import REPORT, build_report
from ndtrain.launch.report.compare import compare_page
import os


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="an HTML report of a run directory, or one page comparing runs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, action="append", metavar="DIR",
                   help="run directory (written by ndtrain train); repeat it to compare runs on one page")
    p.add_argument("--out", metavar="PATH", help="where to write the page (default: DIR/report.html for one run, "
                                                 "compare.html beside the runs for several)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention heat map")
    p.add_argument("--no-samples", action="store_true", help="skip the text samples (greedy decoding at report time)")
    p.set_defaults(func=main)


def _check_run_dir(d: Path) -> None:
    if not d.is_dir():
        raise UsageError(f"{d}: no such run directory")
    if not (d / rundir.METRICS).is_file() and not (d / rundir.CONFIG).is_file():
        raise UsageError(f"{d}: neither {rundir.METRICS} nor {rundir.CONFIG} here - not a run directory written "
                         f"by `ndtrain train`")


def main(args) -> int:
    runs = [Path(r) for r in args.run]
    for d in runs:
        _check_run_dir(d)
    try:
        if len(runs) == 1:
            text = build_report(runs[0], attention=not args.no_attention, samples=not args.no_samples)
            out = Path(args.out) if args.out else runs[0] / REPORT
        else:
            text = compare_page(runs)
            out = Path(args.out) if args.out else \
                Path(os.path.commonpath([str(d.resolve()) for d in runs])) / "compare.html"
    except ValueError as e:  # an unreadable metrics.jsonl line names the file and line
        raise UsageError(str(e)) from None
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name such as {out / 'compare.html'}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
    rundir.atomic_write_text(out, text)
    print(f"wrote {out} ({len(text) // 1024} KiB)")
    return 0
