"""`ndtrain runs [DIR]`: the run directories under DIR (default runs/), one line each.

    ndtrain runs                    # status, task, model, steps done / planned, final metrics, wall time
    ndtrain runs runs/ --json       # one JSON object per run, for scripts

Status is read from the files a run leaves (launch/report/runinfo.py): finished (summary.json, all steps done),
failed (an error record in metrics.jsonl), interrupted (neither: stopped early, or still running; "resumable from
step N" when a checkpoint is there: `ndtrain train --resume DIR`). Compare runs on one page with `ndtrain report --run A --run B`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ndtrain.launch.errors import UsageError
from ndtrain.launch.report.runinfo import find_runs, run_facts

SHORT = {"loss": "val_loss", "accuracy": "acc", "exact_match": "exact", "token_accuracy": "tok_acc",
         "perplexity": "ppl", "bleu": "BLEU", "mse": "mse"}


def add_parser(sub) -> None:
    p = sub.add_parser("runs", help="list run directories: status, task, model, steps, final metrics, wall time",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="runs", help="where the runs are (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    p.set_defaults(func=main)


def metrics_text(final_eval: dict) -> str:
    parts = []
    for k, v in final_eval.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{SHORT.get(k, k)} {v:.2f}" if k == "bleu" else f"{SHORT.get(k, k)} {v:.4g}")
    return " ".join(parts) or "-"


def wall_text(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def main(args) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    facts = [run_facts(d) for d in find_runs(root)]
    if args.json:
        for f in facts:
            print(json.dumps({"run": str(f.path), "status": f.status, "note": f.note, "task": f.task,
                              "model": f.model, "steps": f.steps_done, "steps_planned": f.steps_total,
                              "final_loss": f.final_loss, "eval": f.final_eval, "wall_s": f.wall_s}))
        return 0
    if not facts:
        print(f"{root}: no run directories (a run directory holds config.toml or metrics.jsonl)")
        return 0
    rows = [["run", "status", "task", "model", "steps", "final metrics (validation)", "wall", "note"]]
    for f in facts:
        steps = f"{f.steps_done}/{f.steps_total}" if f.steps_total else str(f.steps_done)
        rows.append([str(f.path), f.status, f.task, f.model, steps, metrics_text(f.final_eval), wall_text(f.wall_s),
                     f.note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0
