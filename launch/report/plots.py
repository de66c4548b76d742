"""PNG plots of a run's metrics.jsonl (launch/rundir.py records), with matplotlib's Agg canvas.

No pyplot: figures are built with the object API and rendered by FigureCanvasAgg, so nothing touches a global
backend or a display, and plotting works inside the trainer, in tests and on headless CI machines.

    plots = metric_plots(rows)      # [(name, title, png bytes)] for every series the records have
Series (each plotted only when the records carry it):
    loss          train loss per logged step, and the eval loss at each evaluation
    eval          the other eval metrics (accuracy, exact_match, token_accuracy, mse, perplexity, bleu)
    lr            learning rate
    throughput    tokens_per_s (or samples_per_s)
    grad_norm     global gradient norm (before clipping)
    step_time     seconds per step (step_s / step_time: the slowest rank in a distributed run), and per rank when
                  the records say (see per_rank_step_times)
"""
from __future__ import annotations

import io
import math

from ndtrain.launch.rundir import eval_events, train_events
import numpy as np

FIGSIZE = (6.4, 3.6)
DPI = 100


def _num(v) -> float | None:
    """A finite float, or None (strings "nan"/"inf" are how rundir writes non-finite values)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that have a finite value for it."""
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None and "step" in r:
            xs.append(int(r["step"]))
            ys.append(v)
    return xs, ys


def _figure(title: str, xlabel: str = "step", ylabel: str = ""):
    from matplotlib.figure import Figure  # matplotlib: ~1 s, only when a report is drawn
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def to_png(fig, tight: bool = True) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: only when a report is drawn
    FigureCanvasAgg(fig)
    if tight:  # fixed margins: tight_layout measures every label and doubles the rendering time
        fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _line_plot(title: str, lines: list[tuple[str, list, list, dict]], ylabel: str = "", logy: bool = False) -> bytes:
    fig, ax = _figure(title, ylabel=ylabel)
    for label, xs, ys, style in lines:
        ax.plot(xs, ys, label=label, **style)
    values = [y for _, _, ys, _ in lines for y in ys]
    if logy and values and min(values) > 0 and max(values) / min(values) > 20:  # log only where it helps
        ax.set_yscale("log")
    if len(lines) > 1:
        ax.legend()
    return to_png(fig)


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
        if "rank" in r and "error" not in r:
            add(r["rank"], r["step"], r.get("step_s", r.get("step_time")))
    return out


def plot_specs(rows: list[dict]) -> list[dict]:
    """What metric_plots draws, without drawing it: [{"name", "title", "lines": [(label, xs, ys, style)],
    "ylabel", "logy"}] for the series present in the records."""
    train = [r for r in train_events(rows) if "error" not in r]
    evals = eval_events(rows)
    eval_rows = [{"step": r["step"], **r["eval"]} for r in evals if isinstance(r.get("eval"), dict)]
    specs = []

    def add(name, title, lines, ylabel="", logy=False):
        lines = [ln for ln in lines if ln[1]]
        if lines:
            specs.append({"name": name, "title": title, "lines": lines, "ylabel": ylabel, "logy": logy})

    add("loss", "Loss (train and validation)",
        [("train", *series(train, "loss"), {}), ("val", *series(eval_rows, "loss"), {"marker": "o"})], "loss", True)
    eval_keys = [k for k in dict.fromkeys(k for r in eval_rows for k in r) if k not in ("step", "loss")]
    add("eval", "Validation metrics", [(k, *series(eval_rows, k), {"marker": "o"}) for k in eval_keys])
    add("lr", "Learning rate", [("lr", *series(train, "lr"), {})], "lr")
    xs, ys = series(train, "tokens_per_s")
    if not xs:
        xs, ys = series(train, "samples_per_s")
    add("throughput", "Throughput", [("items/s", xs, ys, {})], "items / s (all ranks)")
    add("grad_norm", "Gradient norm (global, before clipping)", [("norm", *series(train, "grad_norm"), {})], "norm",
        True)
    lines = []
    for key in ("step_time", "step_s"):
        xs, ys = series([r for r in train if "rank" not in r], key)
        if xs:
            lines.append(("job (slowest rank)" if key == "step_time" else "step", xs, ys, {"linewidth": 2}))
            break
    for rank, (xs, ys) in sorted(per_rank_step_times(rows).items()):
        lines.append((f"rank {rank}", xs, ys, {"linewidth": 1, "alpha": 0.8}))
    add("step_time", "Seconds per step", lines, "s")
    return specs


def metric_plots(rows: list[dict]) -> list[tuple[str, str, bytes]]:
    """[(name, title, PNG bytes)] for the series present in the records (see the module docstring)."""
    return [(s["name"], s["title"], _line_plot(s["title"], s["lines"], s["ylabel"], s["logy"]))
            for s in plot_specs(rows)]


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


__all__ = ["metric_plots", "plot_specs", "series", "per_rank_step_times", "attention_png", "to_png"]
