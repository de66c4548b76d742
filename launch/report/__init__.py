"""The run report: PNG plots of metrics.jsonl and a self-contained DIR/report.html.

    path = write_report("runs/reverse")     # -> runs/reverse/report.html (plots also in runs/reverse/plots/*.png)

The page has: the summary (summary.json, or a note when the run did not finish), the final evaluation, the error
record of a failed run, the plots (launch/report/plots.py), an attention heat map for seq2seq Transformers
(launch/report/attention.py), the topology (topology.json, ranks.json; written by the distributed launchers) and
the config (config.toml). Each part that cannot be made is replaced by a note, never by a failure of the whole
report: write_report is what `ndtrain train` calls at the end, and a report must not break a finished run.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from ndtrain.launch import rundir

from . import html as H
from .plots import metric_plots
from ndtrain.launch.restore import load_run
from .attention import attention_map

REPORT = rundir.REPORT
PLOTS_DIR = rundir.PLOTS


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _summary_section(run_dir: Path) -> str:
    summary = _read_json(run_dir / rundir.SUMMARY)
    if summary is None:
        return '<p class="note">No summary.json: the run did not finish (or is still running).</p>'
    flat = [(k, v) for k, v in summary.items() if k != "eval"]
    out = H.kv_table(flat, "summary")
    if isinstance(summary.get("eval"), dict):
        out += "<h3>Final evaluation</h3>" + H.kv_table(list(summary["eval"].items()), "final-eval")
    return out


def _attention_section(run_dir: Path) -> str:
    try:
        run = load_run(run_dir)
    except Exception as e:  # noqa: BLE001 - a note in the page, not a failed report
        return f'<p class="note">No attention map: the model could not be restored ({H.esc(e)}).</p>'
    if run.kind != "seq2seq":
        return ""
    try:
        png, caption = attention_map(run)
    except Exception as e:  # noqa: BLE001
        return f'<p class="note">No attention map: {H.esc(type(e).__name__)}: {H.esc(e)}</p>'
    if png is None:
        return f'<p class="note">{H.esc(caption)}</p>'
    (run_dir / PLOTS_DIR).mkdir(exist_ok=True)
    (run_dir / PLOTS_DIR / "attention.png").write_bytes(png)
    return H.figure(png, "attention", caption)


def build_report(run_dir: str | Path, *, attention: bool = True) -> str:
    """The HTML text of the report of run_dir (also writes run_dir/plots/*.png)."""
    d = Path(run_dir)
    sections = [("Summary", _summary_section(d))]
    rows: list[dict] = []
    if (d / rundir.METRICS).is_file():
        rows = rundir.read_metrics(d)
    errors = [r for r in rows if "error" in r]
    if errors:
        e = errors[-1]
        sections.append(("Error", f'<p class="error">step {H.esc(e.get("step"))}, rank {H.esc(e.get("rank"))}: '
                                  f'{H.esc(e["error"])}</p>' + H.pre(e.get("traceback", ""))))
    plots = metric_plots(rows) if rows else []
    if plots:
        (d / PLOTS_DIR).mkdir(exist_ok=True)
        figs = []
        for name, title, png in plots:
            (d / PLOTS_DIR / f"{name}.png").write_bytes(png)
            figs.append(H.figure(png, name, title))
        sections.append(("Plots", "\n".join(figs)))
    else:
        sections.append(("Plots", '<p class="note">No metrics records (metrics.jsonl is missing or empty).</p>'))
    if attention:
        att = _attention_section(d)
        if att:
            sections.append(("Attention", att))
    topo, ranks = _read_json(d / rundir.TOPOLOGY), _read_json(d / rundir.RANKS)
    if topo is not None or ranks is not None:
        inner = ""
        if isinstance(topo, dict):
            inner += H.kv_table(list(topo.items()), "topology")
        if isinstance(ranks, list):
            inner += H.records_table([r for r in ranks if isinstance(r, dict)], "ranks")
        sections.append(("Topology", inner))
    if (d / rundir.CONFIG).is_file():
        sections.append(("Config", H.pre((d / rundir.CONFIG).read_text())))
    return H.page(f"ndtrain run {d.resolve().name}", sections)


def write_report(run_dir: str | Path, *, attention: bool = True, quiet: bool = True) -> Path | None:
    """Write run_dir/report.html (atomically) and run_dir/plots/*.png; returns the page's path.

    Safe to call at the end of `ndtrain train`: any failure is printed as one line on stderr and None is
    returned (the run's results are never lost to a plotting problem)."""
    d = Path(run_dir)
    try:
        text = build_report(d, attention=attention)
        rundir.atomic_write_text(d / REPORT, text)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"ndtrain: could not write {d / REPORT}: {type(e).__name__}: {e}", file=sys.stderr)
        if not quiet:
            traceback.print_exc()
        return None
    return d / REPORT


__all__ = ["write_report", "build_report", "REPORT", "PLOTS_DIR"]
