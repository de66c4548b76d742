"""One page comparing runs: overlaid curves, a table of final metrics, and the config keys that differ.

    text = compare_page(["runs/a", "runs/b"])       # self-contained HTML, as the single-run report
    (`ndtrain report --run runs/a --run runs/b --out cmp.html` writes it)

The table of final metrics also counts membership changes and stragglers when a run's summary has them (elastic
and distributed runs). Curves, each against the step and against wall-clock seconds since the run started: training loss, every
validation metric any run has (loss, accuracy, BLEU, ...), and throughput. One line per run, the same colour for a
run in every panel.
"""
from __future__ import annotations

from pathlib import Path

from ndtrain.launch import rundir

from . import html as H
from . import labels as L
from .plots import draw, eval_rows, metric_name, panel, series, throughput_key, to_png, wall_clock
from .runinfo import RunFacts, run_facts

SKIP_KEYS = ("run.out",)  # differs by construction: the run column names the directory


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the directory name, with its parent where two runs share a name."""
    names = [p.name for p in paths]
    out = []
    for p, n in zip(paths, names):
        out.append(f"{p.parent.name}/{n}" if names.count(n) > 1 else n)
    if len(set(out)) < len(out):
        out = [str(p) for p in paths]
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (prefix.startswith("model.") or key.endswith("schedule_kwargs")):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(configs: list[dict]) -> list[tuple[str, list]]:
    """[(dotted key, [value per run])] for the keys whose values are not all equal (missing shows as None)."""
    flat = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    diff = []
    for k in keys:
        if k in SKIP_KEYS:
            continue
        values = [f.get(k) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff.append((k, values))
    return diff


def comparison_specs(facts: list[RunFacts], labels: list[str]) -> list[dict]:
    """Plot specs (launch/report/plots.py) with one line per run: loss, each eval metric, throughput; each with a
    panel against the step and one against wall-clock seconds."""
    colours = [f"C{i % 10}" for i in range(len(facts))]
    trains = [wall_clock([r for r in rundir.train_events(f.rows) if "error" not in r]) for f in facts]
    evals = [eval_rows(f.rows) for f in facts]
    specs = []

    def add(name, title, ylabel, per_run: list[list[dict]], key, marker=None, fraction=False):
        style = {"marker": marker} if marker else {}
        by_step = [(lab, *series(rows, key), {"color": c, **style}) for lab, rows, c in zip(labels, per_run, colours)]
        by_time = [(lab, *series(rows, key, "wall_s"), {"color": c, **style})
                   for lab, rows, c in zip(labels, per_run, colours)]
        panels = [panel(f"{title} against step", by_step, ylabel, fraction=fraction),
                  panel(f"{title} against wall-clock", by_time, ylabel, xlabel="seconds since start",
                        fraction=fraction)]
        panels = [p for p in panels if p["lines"]]
        if panels:
            specs.append({"name": name, "title": title, "panels": panels, "cols": 2, "size": (11.0, 3.8)})

    add("loss", "Training loss", "loss", trains, "loss")
    eval_keys = list(dict.fromkeys(k for rows in evals for r in rows for k in r
                                   if k not in ("step", "time", "wall_s")))
    for k in eval_keys:
        add(f"eval_{k}", f"Validation {metric_name(k)}", metric_name(k), evals, k, marker="o",
            fraction=k in ("accuracy", "exact_match", "token_accuracy"))
    key, label = throughput_key([r for rows in trains for r in rows])
    add("throughput", "Throughput", label, trains, key)
    return specs


def final_table(facts: list[RunFacts], labels: list[str]) -> str:
    metric_keys = list(dict.fromkeys(k for f in facts for k in f.final_eval))
    header = ["run", "status", "task", "model", "steps", "wall time", "final training loss"] + \
        [f"validation {metric_name(k)}" for k in metric_keys]
    extra = [(key, words) for key, words in (("membership_changes", "membership changes"),
                                              ("stragglers", "stragglers named"))
             if any(getattr(f, key) is not None for f in facts)]  # distributed runs that say so
    header += [words for _, words in extra]
    rows = []
    for f, lab in zip(facts, labels):
        steps = f"{f.steps_done} / {f.steps_total}" if f.steps_total else str(f.steps_done)
        wall = L.seconds_text(f.wall_s) if isinstance(f.wall_s, (int, float)) else "-"
        loss = f"{f.final_loss:.4f}" if isinstance(f.final_loss, (int, float)) else "-"
        rows.append([lab, f.status + (f" ({f.note})" if f.note else ""), f.task, f.model, steps, wall, loss] +
                    [L.metric_text(k, f.final_eval[k]) if k in f.final_eval else "-" for k in metric_keys] +
                    [str(getattr(f, key)) if getattr(f, key) is not None else "-" for key, _ in extra])
    return H.table(header, rows, "final-metrics")


def compare_page(run_dirs: list[str | Path]) -> str:
    paths = [Path(p) for p in run_dirs]
    facts = [run_facts(p) for p in paths]
    labels = run_labels(paths)
    sections = [("Runs", "<p>" + "<br>".join(f"<b>{H.esc(lab)}</b>: {H.esc(p.resolve())}"
                                             for lab, p in zip(labels, paths)) + "</p>"),
                ("Final metrics", final_table(facts, labels))]
    diff = config_differences([f.config for f in facts])
    if diff:
        rows = [[k] + [repr(v) if v is not None else "(not set)" for v in values] for k, values in diff]
        sections.append(("Config keys that differ", H.table(["key"] + labels, rows, "config-diff")))
    else:
        sections.append(("Config keys that differ", "<p>None: the runs have the same config (but run.out).</p>"))
    specs = comparison_specs(facts, labels)
    figs = [H.figure(to_png(draw(s)), s["name"], s["title"], wide=True) for s in specs]
    sections.append(("Curves", H.grid(figs) if figs else '<p class="note">No metrics records in these runs.</p>'))
    return H.page(f"ndtrain: {len(paths)} runs compared ({', '.join(labels)})", sections)


__all__ = ["compare_page", "config_differences", "comparison_specs", "run_labels"]
