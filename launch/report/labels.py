"""summary.json keys in words, with units: what the report and `ndtrain runs` show instead of raw JSON names.

    label("mean_comm_share"), value_text("mean_comm_share", 0.0365)  # -> "Time waiting on communication",
                                                                      #    "3.7% of the step (mean over steps)"
Keys not listed here are shown with underscores as spaces and their value as is.
"""
from __future__ import annotations

import json
import math


def seconds_text(s) -> str:
    """75.2 -> '75.2 s (1 min 15 s)'."""
    s = float(s)
    if not math.isfinite(s):
        return str(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{s:,.0f} s ({h} h {m} min)" if h else f"{s:,.1f} s ({m} min {sec} s)"


def _int(v) -> str:
    return f"{int(v):,}"


def _yes(v) -> str:
    return "yes" if v else "no"


# key -> (words, value formatter)
SUMMARY = {
    "task": ("Task", str),
    "model": ("Model", str),
    "steps": ("Optimizer steps", _int),
    "wall_s": ("Training wall time", seconds_text),
    "coordinator_wall_s": ("Job wall time (coordinator, incl. start-up)", seconds_text),
    "final_loss": ("Final training loss", lambda v: f"{float(v):.4f}"),
    "world_size": ("Workers (ranks)", _int),
    "global_batch_size": ("Global batch size", lambda v: f"{int(v):,} rows per step (all ranks)"),
    "params": ("Parameters", _int),
    "skipped_steps": ("Skipped steps (non-finite loss or gradient)", _int),
    "deterministic": ("Deterministic mode", _yes),
    "mean_tokens_per_s": ("Throughput", lambda v: f"{float(v):,.0f} tokens/s (mean over logged steps)"),
    "mean_samples_per_s": ("Throughput", lambda v: f"{float(v):,.0f} samples/s (mean over logged steps)"),
    "mean_comm_share": ("Time waiting on communication",
                        lambda v: f"{100 * float(v):.1f}% of the step (mean over logged steps)"),
    "mean_comm_sent_bytes": ("Bytes sent per step", lambda v: f"{float(v) / 1e6:,.2f} MB per rank (mean over logged "
                                                               f"steps)"),
    "mean_comm_blocked_s": ("Time blocked in communication",
                            lambda v: f"{1000 * float(v):,.1f} ms per step, as the transport measured it (mean)"),
    "link": ("Link between ranks", lambda v: f"{float(v['bandwidth_Bps']) / 1e6:,.1f} MB/s, "
                                            f"{1000 * float(v['latency_s']):.2f} ms (all-reduce measured at start-up)"),
    "mean_step_time": ("Time per step", lambda v: f"{1000 * float(v):,.1f} ms (mean over logged steps)"),
    "membership_changes": ("Membership changes (workers that left or joined)", _int),
    "restarts": ("Rank-group restarts from a checkpoint", _int),
    "stragglers": ("Stragglers named", lambda v: "; ".join(
        f"rank {s['rank']} on {s.get('host') or '?'} from step {s['first_step']} ({float(s['factor']):.1f}x the "
        f"others' compute)" for s in v) if v else "none"),
    "param_checksum": ("Parameter checksum", str),
    "config_hash": ("Config hash", str),
}


def label(key: str) -> str:
    return SUMMARY[key][0] if key in SUMMARY else key.replace("_", " ").capitalize()


def value_text(key: str, value) -> str:
    if key in SUMMARY:
        try:
            return SUMMARY[key][1](value)
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def metric_text(key: str, value) -> str:
    """An eval metric's value: fractions as 0.9870 (98.7%), BLEU with one decimal, the rest to 4 significant."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if key in ("accuracy", "exact_match", "token_accuracy") and 0.0 <= v <= 1.0:
        return f"{v:.4f} ({100 * v:.1f}%)"
    if key == "bleu":
        return f"{v:.2f}"
    return f"{v:.4g}"


__all__ = ["label", "value_text", "metric_text", "seconds_text", "SUMMARY"]
