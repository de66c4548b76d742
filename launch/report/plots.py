"""PNG plots of a run's metrics.jsonl (launch/rundir.py records), with matplotlib's Agg canvas.

No pyplot: figures are built with the object API and rendered by FigureCanvasAgg, so nothing touches a global
backend or a display, and plotting works inside the trainer, in tests and on headless CI machines.

    plots = metric_plots(rows)      # [(name, title, png bytes)] for every series the records have
    fig = draw(spec)                # one spec of plot_specs(rows) as a matplotlib Figure (tests inspect its axes)
Figures (each drawn only when the records carry the series):
    loss          train loss per logged step, and the eval loss at each evaluation
    eval          one small panel per other eval metric (accuracy, exact match, token accuracy, mse, perplexity),
                  each with its own y axis and no offset, so 1.0 reads as 1.0
    bleu          BLEU against the step and against wall-clock time (eval events' `wall_time`, else `time`)
    lr            learning rate
    throughput    tokens_per_s (or samples_per_s), all ranks together
    grad_norm     global gradient norm (before clipping)
    step_time     seconds per step (step_s / step_time: the slowest rank in a distributed run), and per rank when
                  the records say (see per_rank_step_times)
    world_size    workers over steps (elastic Ray runs), only when a membership change happened or the train
                  records' world_size varies; each change marked (docs/elastic.md)
Every panel has a title, axis labels and a legend; every linear axis has plain tick labels (no offset, no
scientific multiplier).
"""
from __future__ import annotations

import io
import math

from ndtrain.launch.rundir import eval_events, run_events, train_events
import numpy as np

FIGSIZE = (6.4, 3.6)
PANEL_SIZE = (3.2, 2.6)  # inches per small panel (the eval metrics: two per row, as wide as one plot)
DPI = 100

# eval metric -> how the report names it; FRACTIONS are in [0, 1] and get a 0..1-ish axis
METRIC_NAMES = {"loss": "loss", "accuracy": "accuracy", "exact_match": "exact match",
                "token_accuracy": "token accuracy", "bleu": "BLEU", "perplexity": "perplexity",
                "mse": "mean squared error", "chrf": "chrF"}
FRACTIONS = ("accuracy", "exact_match", "token_accuracy")


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key.replace("_", " "))


def _num(v) -> float | None:
    """A finite float, or None (strings "nan"/"inf" are how rundir writes non-finite values)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, values) of `key` over the rows that have a finite value for it; xs are steps (ints), or another
    record field (x="time": seconds since the run started)."""
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        xv = _num(r.get(x))
        if v is not None and xv is not None:
            xs.append(int(xv) if x == "step" else xv)
            ys.append(v)
    return xs, ys


def wall_clock(rows: list[dict]) -> list[dict]:
    """Each record with `wall_s`: seconds since the run started. Eval events may carry `wall_time` (seconds since
    the start, or an epoch timestamp: then counted from the first one); otherwise `time` is used."""
    stamps = [_num(r.get("wall_time")) for r in rows]
    base = min((t for t in stamps if t is not None and t > 1e8), default=None)  # epoch seconds, not a duration
    out = []
    for r, t in zip(rows, stamps):
        if t is not None:
            t = t - base if base is not None and t > 1e8 else t
        else:
            t = _num(r.get("time"))
        out.append({**r, "wall_s": t} if t is not None else r)
    return out


def _plain_ticks(ax, axis: str = "both") -> None:
    """No offset and no scientific multiplier on linear axes: a tick reads as the value it marks."""
    axes = ("x", "y") if axis == "both" else (axis,)
    for a in axes:
        scale = ax.get_xscale() if a == "x" else ax.get_yscale()
        if scale == "linear":
            ax.ticklabel_format(axis=a, style="plain", useOffset=False)


def _y_limits(ax, values: list[float], fraction: bool) -> None:
    """Readable limits for nearly constant series (an exact match of 1.0 everywhere must not zoom into 1e-5)."""
    if not values:
        return
    lo, hi = min(values), max(values)
    span = hi - lo
    if fraction and lo >= 0.0 and hi <= 1.0:  # on tenths, so 1.0 and 0.0 are always ticks
        lower = max(0.0, math.floor((lo - 0.05) * 10) / 10)
        upper = min(1.0, math.ceil((hi + 0.05) * 10) / 10)
        ax.set_ylim(lower - 0.02 * (lower == 0.0), upper + 0.02 * (upper == 1.0))
    elif span < 1e-3 * max(abs(lo), abs(hi), 1e-12):
        pad = max(0.02 * max(abs(lo), abs(hi)), 1e-6)
        ax.set_ylim(lo - pad, hi + pad)


def panel(title: str, lines: list, ylabel: str, xlabel: str = "step", logy: bool = False,
          fraction: bool = False, integer_y: bool = False) -> dict:
    """One axes: lines [(label, xs, ys, style)] (empty ones dropped); integer_y: whole-number y ticks (workers)."""
    return {"title": title, "lines": [ln for ln in lines if ln[1]], "ylabel": ylabel, "xlabel": xlabel,
            "logy": logy, "fraction": fraction, "integer_y": integer_y}


def _draw_panel(ax, p: dict, legend: bool = True) -> None:
    ax.set_title(p["title"], fontsize=10)
    ax.set_xlabel(p["xlabel"])
    ax.set_ylabel(p["ylabel"])
    ax.grid(True, alpha=0.3)
    for label, xs, ys, style in p["lines"]:
        if len(xs) == 1 and "marker" not in style:
            style = {**style, "marker": "o"}  # a single record: a line alone would draw nothing
        ax.plot(xs, ys, label=label, **style)
    if p["xlabel"] == "step":
        from matplotlib.ticker import MaxNLocator  # matplotlib: ~1 s, only when a report is drawn
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 28.5
    values = [y for _, _, ys, _ in p["lines"] for y in ys]
    if p["logy"] and values and min(values) > 0 and max(values) / min(values) > 20:  # log only where it helps
        ax.set_yscale("log")
    else:
        _y_limits(ax, values, p["fraction"])
    _plain_ticks(ax)
    if p.get("integer_y"):
        from matplotlib.ticker import MaxNLocator  # matplotlib: only when a report is drawn
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        lo = min(values, default=1)
        ax.set_ylim(max(0, lo - 1), max(values, default=1) + 1)
    if legend:
        ax.legend(fontsize=8)


def draw(spec: dict):
    """A plot spec (plot_specs) -> matplotlib Figure: one axes per panel, up to `cols` per row."""
    from matplotlib.figure import Figure  # matplotlib: ~1 s, only when a report is drawn
    panels = spec["panels"]
    cols = min(len(panels), spec.get("cols", 3))
    rows = (len(panels) + cols - 1) // cols
    if spec.get("size"):
        size = spec["size"]
    elif len(panels) == 1:
        size = FIGSIZE
    else:
        size = (max(FIGSIZE[0], PANEL_SIZE[0] * cols), PANEL_SIZE[1] * rows + 0.4)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    if len(panels) > 1:
        fig.suptitle(spec["title"])
    for i, p in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, cols, i + 1), p, legend=spec.get("legend", True))
    return fig


def to_png(fig, tight: bool = True) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: ~1 s, only when a report is drawn
    FigureCanvasAgg(fig)
    if tight and fig.get_layout_engine() is None:  # fixed margins: tight_layout doubles the rendering time
        fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def per_rank_step_times(rows: list[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """rank -> (steps, seconds per step), from whichever form the records use:
    a dict or list per record under "rank_step_s" / "step_time_by_rank" / "rank_step_time", or raw per-rank
    records (a "rank" key beside "step_s" / "step_time"). Empty when the records have none (a local run)."""
    out: dict[int, tuple[list[int], list[float]]] = {}

    def add(rank, step, v):
        v = _num(v)
        if v is not None:
            xs, ys = out.setdefault(int(rank), ([], []))
            xs.append(int(step))
            ys.append(v)

    for r in rows:
        if "step" not in r:
            continue
        for key in ("rank_step_s", "step_time_by_rank", "rank_step_time"):
            per = r.get(key)
            if isinstance(per, dict):
                for rank, v in per.items():
                    add(rank, r["step"], v)
            elif isinstance(per, list):
                for rank, v in enumerate(per):
                    add(rank, r["step"], v)
        if "rank" in r and "error" not in r and "event" not in r:
            add(r["rank"], r["step"], r.get("step_s", r.get("step_time")))
    return out


def world_size_lines(rows: list[dict]) -> list:
    """Panel lines of the workers over steps: the world size as a step curve (from the train records'
    "world_size" and the membership events) and a marker at each change. [] when W never changed."""
    changes = [e for e in run_events(rows, "membership") if _num(e.get("step")) is not None
               and _num(e.get("world_size")) is not None]
    points = [(int(r["step"]), int(r["world_size"])) for r in train_events(rows)
              if _num(r.get("step")) is not None and _num(r.get("world_size")) is not None]
    if not changes and len({w for _, w in points}) < 2:
        return []
    if changes and _num(changes[0].get("previous_world_size")) is not None:
        points.append((0, int(changes[0]["previous_world_size"])))  # the start, before the first change
    points += [(int(e["step"]), int(e["world_size"])) for e in changes]
    last_step = max((int(r["step"]) for r in rows if _num(r.get("step")) is not None), default=0)
    points.sort(key=lambda p: p[0])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if xs[-1] < last_step:
        xs.append(last_step)
        ys.append(ys[-1])
    lines = [("workers", xs, ys, {"drawstyle": "steps-post", "linewidth": 2})]
    for kind, marker, colour in (("shrink", "v", "C3"), ("grow", "^", "C2")):
        mine = [e for e in changes if e.get("change") == kind]
        lines.append((kind, [int(e["step"]) for e in mine], [int(e["world_size"]) for e in mine],
                      {"marker": marker, "linestyle": "none", "color": colour, "markersize": 8}))
    return lines


def eval_rows(rows: list[dict]) -> list[dict]:
    """Eval events flattened: {"step", "time", "wall_s", <metric>: value}."""
    out = []
    for r in wall_clock(eval_events(rows)):
        if isinstance(r.get("eval"), dict):
            out.append({k: r[k] for k in ("step", "time", "wall_s") if k in r} | r["eval"])
    return out


def eval_metric_keys(rows: list[dict]) -> list[str]:
    """The eval metrics other than loss, in first-seen order."""
    return [k for k in dict.fromkeys(k for r in eval_rows(rows) for k in r)
            if k not in ("step", "time", "wall_s", "loss") and any(_num(r.get(k)) is not None
                                                                     for r in eval_rows(rows))]


def throughput_key(train: list[dict]) -> tuple[str, str]:
    """(record key, axis label) of the throughput the records carry."""
    if series(train, "tokens_per_s")[0]:
        return "tokens_per_s", "tokens / s (all ranks)"
    return "samples_per_s", "samples / s (all ranks)"


def plot_specs(rows: list[dict]) -> list[dict]:
    """What metric_plots draws, without drawing it: [{"name", "title", "panels": [panel(...)]}] for the series
    present in the records (a panel: {"title", "lines": [(label, xs, ys, style)], "ylabel", "xlabel", "logy",
    "fraction"})."""
    train = [r for r in train_events(rows) if "error" not in r]
    evals = eval_rows(rows)
    specs = []

    def add(name, title, panels, **kw):
        panels = [p for p in panels if p["lines"]]
        if panels:
            specs.append({"name": name, "title": title, "panels": panels, **kw})

    add("loss", "Loss (train and validation)", [panel(
        "Loss (train and validation)", [("train", *series(train, "loss"), {}),
                                        ("validation", *series(evals, "loss"), {"marker": "o"})], "loss", logy=True)])
    keys = eval_metric_keys(rows)
    add("eval", "Validation metrics", [
        panel(metric_name(k), [(metric_name(k), *series(evals, k), {"marker": "o"})], metric_name(k),
              fraction=k in FRACTIONS) for k in keys if k != "bleu"], legend=False, cols=2)
    if "bleu" in keys:
        add("bleu", "BLEU on the validation set over training", [
            panel("BLEU against step", [("BLEU", *series(evals, "bleu"), {"marker": "o"})], "BLEU"),
            panel("BLEU against wall-clock", [("BLEU", *series(evals, "bleu", "wall_s"), {"marker": "o"})], "BLEU",
                  xlabel="seconds since start")], cols=2, legend=False)
    add("lr", "Learning rate", [panel("Learning rate", [("lr", *series(train, "lr"), {})], "learning rate")])
    key, label = throughput_key(train)
    add("throughput", "Throughput", [panel("Throughput", [(label.split(" (")[0], *series(train, key), {})], label)])
    add("grad_norm", "Gradient norm (global, before clipping)", [panel(
        "Gradient norm (global, before clipping)", [("grad norm", *series(train, "grad_norm"), {})], "L2 norm",
        logy=True)])
    lines = []
    for k in ("step_time", "step_s"):
        xs, ys = series([r for r in train if "rank" not in r], k)
        if xs:
            lines.append(("job (slowest rank)" if k == "step_time" else "step", xs, ys, {"linewidth": 2}))
            break
    for rank, (xs, ys) in sorted(per_rank_step_times(rows).items()):
        lines.append((f"rank {rank}", xs, ys, {"linewidth": 1, "alpha": 0.8}))
    add("step_time", "Seconds per step", [panel("Seconds per step", lines, "seconds")])
    add("world_size", "Workers over steps", [panel("Workers over steps", world_size_lines(rows), "workers",
                                                   integer_y=True)])
    return specs


def metric_plots(rows: list[dict]) -> list[tuple[str, str, bytes]]:
    """[(name, title, PNG bytes)] for the series present in the records (see the module docstring)."""
    return [(s["name"], s["title"], to_png(draw(s))) for s in plot_specs(rows)]


def attention_png(weights, src_tokens: list[str], out_tokens: list[str], title: str) -> bytes:
    """Heat map(s) of attention weights (H, T_out, T_src), one panel per head, queries down, keys across."""
    from matplotlib.figure import Figure  # matplotlib: ~1 s, only when a report is drawn
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        w = w[None]
    H = w.shape[0]
    cols = min(H, 4)
    rows = (H + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.0 * rows + 0.6), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    im = None
    for h in range(H):
        ax = fig.add_subplot(rows, cols, h + 1)
        im = ax.imshow(w[h], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(len(src_tokens)))
        ax.set_xticklabels(src_tokens, fontsize=7, rotation=90)
        ax.set_yticks(range(len(out_tokens)))
        ax.set_yticklabels(out_tokens, fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8)
    return to_png(fig, tight=False)


__all__ = ["metric_plots", "plot_specs", "draw", "panel", "series", "wall_clock", "eval_rows", "metric_name",
           "per_rank_step_times", "world_size_lines", "attention_png", "to_png"]
