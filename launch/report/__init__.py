"""The run report: PNG plots of metrics.jsonl and a self-contained DIR/report.html.

    path = write_report("runs/reverse")     # -> runs/reverse/report.html (plots also in runs/reverse/plots/*.png)

The page has: the summary (summary.json in words with units, or a note when the run did not finish), the final
evaluation, the error record of a failed run, the plots (launch/report/plots.py) in a grid of two columns on wide
windows, text samples made now from the checkpoint (launch/report/samples.py: a few greedy translations beside
their references, or an LM's greedy continuation of a prompt), an attention heat map for seq2seq Transformers
(launch/report/attention.py), the topology (topology.json, ranks.json; written by the distributed launchers) and
the config (config.toml); for a distributed run whose rank group changed or had a straggler, a table of
membership changes and stragglers (launch/report/elastic.py). Each part that cannot be made is replaced by a note, never by a failure of the whole
report: write_report is what `ndtrain train` calls at the end, and a report must not break a finished run.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from ndtrain.launch import rundir

from . import html as H
from . import labels as L
from .plots import metric_name, metric_plots
from ndtrain.launch.restore import load_run
from .samples import text_samples
from .attention import attention_map
from .elastic import elastic_section

REPORT = rundir.REPORT
PLOTS_DIR = rundir.PLOTS_DIR


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def png_width(png: bytes) -> int:
    """Pixel width from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big")


def _summary_section(run_dir: Path) -> str:
    summary = _read_json(run_dir / rundir.SUMMARY)
    if summary is None:
        return '<p class="note">No summary.json: the run did not finish (or is still running).</p>'
    flat = [(k, L.label(k), L.value_text(k, v)) for k, v in summary.items() if k != "eval"]
    out = H.words_table(flat, "summary")
    if isinstance(summary.get("eval"), dict):
        rows = [(k, metric_name(k), L.metric_text(k, v)) for k, v in summary["eval"].items()]
        out += "<h3>Final evaluation (validation set)</h3>" + H.words_table(rows, "final-eval")
    return out


def _restore(run_dir: Path):
    """(the restored run, None) or (None, why not)."""
    try:
        return load_run(run_dir), None
    except Exception as e:  # noqa: BLE001 - a note in the page, not a failed report
        return None, f"the model could not be restored ({e})"


def _samples_section(run) -> str:
    try:
        samples = text_samples(run)
    except Exception as e:  # noqa: BLE001
        return f'<p class="note">No text samples: {H.esc(type(e).__name__)}: {H.esc(e)}</p>'
    if not samples:
        return ""
    if run.kind == "seq2seq":
        intro = (f"<p>The first {len(samples)} validation sources, decoded greedily by the checkpoint of step "
                 f"{run.step}, beside their references.</p>")
        rows = [[s["source"], s["output"], s["reference"], "yes" if s["output"] == s["reference"] else "no"]
                for s in samples]
        return intro + H.table(["source", "model output", "reference", "exact"], rows, "samples", (0, 1, 2))
    intro = (f"<p>The start of the first validation block as a prompt, continued greedily for "
             f"{len(samples[0]['output'])} characters by the checkpoint of step {run.step}.</p>")
    rows = [[s["prompt"], s["output"]] for s in samples]
    return intro + H.table(["prompt", "continuation"], rows, "samples", (0, 1))


def _attention_section(run_dir: Path, run) -> str:
    try:
        png, caption = attention_map(run)
    except Exception as e:  # noqa: BLE001
        return f'<p class="note">No attention map: {H.esc(type(e).__name__)}: {H.esc(e)}</p>'
    if png is None:
        return f'<p class="note">{H.esc(caption)}</p>'
    (run_dir / PLOTS_DIR).mkdir(exist_ok=True)
    (run_dir / PLOTS_DIR / "attention.png").write_bytes(png)
    return H.grid([H.figure(png, "attention", caption, wide=True)])


CAPTIONS = {
    "loss": "Training loss at every logged step (mean over the window since the last record) and the validation "
            "loss at each evaluation.",
    "eval": "Each validation metric in its own panel, with its own axis.",
    "bleu": "Corpus BLEU of greedy (or the configured beam) decoding on the validation set, against the step "
            "and against seconds of wall-clock time since the run started.",
    "lr": "The learning rate the schedule gave each logged step.",
    "throughput": "Items per second over all ranks, measured over each logging window.",
    "grad_norm": "Global L2 norm of the gradient before clipping.",
    "step_time": "Seconds per optimizer step (in a distributed run the slowest rank's; per rank when recorded).",
    "world_size": "Workers in the rank group at each step (an elastic Ray run shrinks when a worker leaves and "
                  "grows when one joins; the global batch, and so the training, stays the same).",
}


def build_report(run_dir: str | Path, *, attention: bool = True, samples: bool = True) -> str:
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
            figs.append(H.figure(png, name, CAPTIONS.get(name, title), wide=png_width(png) > 900))
        sections.append(("Plots", H.grid(figs)))
    else:
        sections.append(("Plots", '<p class="note">No metrics records (metrics.jsonl is missing or empty).</p>'))
    elastic = elastic_section(rows, _read_json(d / rundir.SUMMARY))
    if elastic:
        sections.append(("Workers and stragglers", elastic))
    if attention or samples:
        run, why = _restore(d)
        if run is None:
            if attention:
                sections.append(("Attention", f'<p class="note">No attention map: {H.esc(why)}.</p>'))
        else:
            if samples:
                text = _samples_section(run)
                if text:
                    sections.append(("Samples", text))
            if attention and run.kind == "seq2seq":
                sections.append(("Attention", _attention_section(d, run)))
    topo, ranks = _read_json(d / rundir.TOPOLOGY), _read_json(d / rundir.RANKS)
    if topo is not None or ranks is not None:
        inner = ""
        if isinstance(topo, dict):
            inner += H.words_table([(k, L.label(k), L.value_text(k, v)) for k, v in topo.items()], "topology")
        if isinstance(ranks, list):
            inner += H.records_table([r for r in ranks if isinstance(r, dict)], "ranks")
        sections.append(("Topology", inner))
    if (d / rundir.CONFIG).is_file():
        sections.append(("Config", H.pre((d / rundir.CONFIG).read_text())))
    return H.page(f"ndtrain run {d.resolve().name}", sections)


def write_report(run_dir: str | Path, *, attention: bool = True, samples: bool = True,
                 quiet: bool = True) -> Path | None:
    """Write run_dir/report.html (atomically) and run_dir/plots/*.png; returns the page's path.

    Safe to call at the end of `ndtrain train`: any failure is printed as one line on stderr and None is
    returned (the run's results are never lost to a plotting problem)."""
    d = Path(run_dir)
    try:
        text = build_report(d, attention=attention, samples=samples)
        rundir.atomic_write_text(d / REPORT, text)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"ndtrain: could not write {d / REPORT}: {type(e).__name__}: {e}", file=sys.stderr)
        if not quiet:
            traceback.print_exc()
        return None
    return d / REPORT


__all__ = ["write_report", "build_report", "REPORT", "PLOTS_DIR"]
