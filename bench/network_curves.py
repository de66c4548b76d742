"""Loss against wall-clock time for the runs of `ndtrain bench network --keep-dirs` (issue 19's convergence write-up).

    python bench/network_curves.py WORK [WORK ...] [--targets 0.5,0.05] [--every 20]

WORK is the work directory the bench prints at its end ("bench network: work directory ..."); it holds one run
directory per (profile, option) and `one-worker/`. For each run this prints its validation losses against the wall
time of the training loop (the `time` of each evaluation record: start-up is left out, evaluations are included),
and, for each target loss, the time at which the run first reached it over the one worker's time to it. Several
WORK directories may share one one-worker reference: the first one found is used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def eval_curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, time_s, validation loss) of each evaluation in run/metrics.jsonl."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        ev = r.get("eval")
        if isinstance(ev, dict) and ev.get("loss") is not None and "time" in r:
            out.append((int(r["step"]), float(r["time"]), float(ev["loss"])))
    return out


def time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    return next((t for _, t, loss in curve if loss <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", nargs="+", type=Path)
    p.add_argument("--targets", default="", help="comma-separated validation losses (default: the one worker's final)")
    p.add_argument("--every", type=int, default=0, help="print only evaluations at multiples of this step (0: all)")
    args = p.parse_args(argv)
    runs: dict[str, list] = {}
    for work in args.work:
        for d in sorted(work.iterdir()):
            if (d / "metrics.jsonl").is_file() and d.name not in runs:
                runs[d.name] = eval_curve(d)
    if "one-worker" not in runs:
        print(f"network_curves: no one-worker/ run under {', '.join(map(str, args.work))}", file=sys.stderr)
        return 2
    one = runs.pop("one-worker")
    targets = [float(x) for x in args.targets.split(",") if x] or [one[-1][2]]
    print("| run | " + " | ".join(f"time to {t:g} (× one worker)" for t in targets) + " | final loss |")
    print("|---|" + "---|" * (len(targets) + 1))
    for name, curve in [("one-worker", one), *sorted(runs.items())]:
        cells = []
        for t in targets:
            mine, ref = time_to(curve, t), time_to(one, t)
            cells.append("not reached" if mine is None else
                         f"{mine:.1f} s ({mine / ref:.2f}×)" if ref else f"{mine:.1f} s")
        print(f"| {name} | " + " | ".join(cells) + f" | {curve[-1][2]:.4f} |" if curve else f"| {name} | (no evals) |")
    print()
    print("Loss against wall-clock (step: seconds, loss):")
    for name, curve in [("one-worker", one), *sorted(runs.items())]:
        pts = [c for c in curve if not args.every or c[0] % args.every == 0]
        print(f"  {name}: " + "; ".join(f"{s}: {t:.0f} s {loss:.3f}" for s, t, loss in pts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
