"""The report's "Workers and stragglers" section: what changed in the rank group while the run trained.

    html = elastic_section(rows, summary)     # "" when nothing happened (no section)

Two tables, from the event records of metrics.jsonl (docs/elastic.md, "In the report"):
  membership changes  {"event": "membership", "step", "change": "shrink" | "grow", "world_size",
                      "previous_world_size", "rank", "host", "reason", "recovery_s"} (elastic Ray runs)
  stragglers          {"event": "straggler", "rank", "host", "step", "compute_s", "median_s", "factor"}
                      (cluster/straggler.py); summary.json's "stragglers" list when the records have none
The plot of workers over steps is launch/report/plots.py's "world_size".
"""
from __future__ import annotations

from ndtrain.launch.rundir import run_events

from . import html as H


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ms(v) -> str:
    return f"{1000 * v:,.1f} ms" if _num(v) else "-"


def membership_rows(rows: list[dict]) -> list[list[str]]:
    """Table rows: step, change, workers (old -> new), rank, host, reason, recovery."""
    out = []
    for e in run_events(rows, "membership"):
        before, after = e.get("previous_world_size"), e.get("world_size")
        workers = f"{before} → {after}" if before is not None else str(after)
        recovery = f"{e['recovery_s']:.2f} s" if _num(e.get("recovery_s")) else "-"
        out.append([str(e.get("step", "-")), str(e.get("change", "-")), workers, str(e.get("rank", "-")),
                    str(e.get("host") or "-"), str(e.get("reason") or "-"), recovery])
    return out


def straggler_rows(rows: list[dict], summary: dict | None) -> list[list[str]]:
    """Table rows: step, rank, host, its compute per step, the others' median, factor."""
    events = run_events(rows, "straggler")
    if events:
        return [[str(e.get("step", "-")), str(e.get("rank", "-")), str(e.get("host") or "-"), _ms(e.get("compute_s")),
                 _ms(e.get("median_s")), f"{e['factor']:.1f}x" if _num(e.get("factor")) else "-"] for e in events]
    named = (summary or {}).get("stragglers")
    return [[str(s.get("first_step", "-")), str(s.get("rank", "-")), str(s.get("host") or "-"), "-", "-",
             f"{s['factor']:.1f}x" if _num(s.get("factor")) else "-"]
            for s in (named if isinstance(named, list) else []) if isinstance(s, dict)]


def elastic_section(rows: list[dict], summary: dict | None) -> str:
    parts = []
    changes = membership_rows(rows)
    if changes:
        parts.append(f"<h3>Membership changes ({len(changes)})</h3><p>Each time a worker left or joined, the "
                     "rank group re-formed in place and resumed at the step shown; recovery is the time from the "
                     "failure (or the new worker's arrival) to the first step of the new group.</p>")
        parts.append(H.table(["step", "change", "workers", "rank", "host", "reason", "recovery"], changes,
                             "membership"))
    stragglers = straggler_rows(rows, summary)
    if stragglers:
        parts.append(f"<h3>Stragglers ({len(stragglers)})</h3><p>A rank whose own compute time per step (its step "
                     "time minus the time it was blocked in communication) exceeded the configured multiple of the "
                     "other ranks' median for the configured number of consecutive steps; the others waited for it "
                     "in every all-reduce. Named once per episode, at the step shown.</p>")
        parts.append(H.table(["step", "rank", "host", "compute per step", "others' median", "factor"], stragglers,
                             "stragglers"))
    return "\n".join(parts)


__all__ = ["elastic_section", "membership_rows", "straggler_rows"]
