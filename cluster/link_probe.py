"""The link between ranks, measured at start-up, and the advice it gives (issue 19: a slow link should say so,
and name the fix, before the run spends hours on it).

    link = probe_link(comm, probe_bytes=4 << 20)     # every rank calls it; every rank gets the same figures
    # {"latency_s": ..., "bandwidth_Bps": ..., "probe_bytes": ...}
    line = advice(link, grad_bytes, compute_s, world)  # None, or the one line naming the fix

Latency: the median of 5 all-reduces of 8 bytes (after one to warm up). Bandwidth: one all-reduce of probe_bytes,
timed after a warm-up of the same size; a ring or chain moves 2 (W - 1) / W x N bytes per rank for N, so
bandwidth = that / (time - latency). Each rank's times are gathered and the slowest taken, so every rank holds the
same figures (the collective is as slow as its slowest link). On the TCP mesh the figures then size the ring's socket
buffers (TcpGroup.tune_link: bandwidth x latency, the bandwidth-delay product).

The communication share of a step, estimated: t_comm = latency x buckets + 2 (W - 1) / W x gradient bytes /
bandwidth, against the step's compute time (measured over the first steps): share = t_comm / (t_comm + compute).
Above ADVISE_SHARE the advice names --compress (2-byte or low-rank gradients), --sync-every with averaging (local
SGD: a parameter all-reduce every H steps) or a larger batch (more compute per byte).
"""
from __future__ import annotations

import time

import numpy as np

ADVISE_SHARE = 0.30


def _timed(comm, buf: np.ndarray) -> float:
    t0 = time.perf_counter()
    comm.allreduce(buf)
    return time.perf_counter() - t0


def probe_link(comm, probe_bytes: int = 4 << 20) -> dict:
    """Latency and bandwidth of the all-reduce between the ranks (see the module docstring)."""
    small = np.zeros(1, dtype=np.float64)
    _timed(comm, small)
    latency = float(np.median([_timed(comm, small) for _ in range(5)]))
    big = np.zeros(max(1, int(probe_bytes) // 4), dtype=np.float32)
    _timed(comm, big)
    t = _timed(comm, big)
    slowest = comm.allgather_obj([latency, t])
    latency = max(float(x[0]) for x in slowest)
    t = max(float(x[1]) for x in slowest)
    w = comm.world_size
    moved = 2.0 * (w - 1) / w * big.nbytes
    link = {"latency_s": latency, "bandwidth_Bps": moved / max(t - latency, 1e-9), "probe_bytes": int(big.nbytes)}
    tune = getattr(getattr(comm, "group", None), "tune_link", None)  # the TCP mesh: buffers for this link's BDP
    if tune is not None:
        tune(link)
    return link


def comm_estimate_s(link: dict, grad_bytes: int, world: int, buckets: int = 1) -> float:
    """Seconds one synchronous step spends moving its gradient over the measured link."""
    moved = 2.0 * (world - 1) / world * grad_bytes
    return link["latency_s"] * buckets + moved / link["bandwidth_Bps"]


def advice(link: dict, grad_bytes: int, compute_s: float, world: int, buckets: int = 1) -> str | None:
    """One line naming the fix when communication would take more than ADVISE_SHARE of a step, else None."""
    t = comm_estimate_s(link, grad_bytes, world, buckets)
    share = t / (t + max(compute_s, 0.0)) if t > 0 else 0.0
    if share <= ADVISE_SHARE:
        return None
    return (f"advice: the link between ranks ({link['bandwidth_Bps'] / 1e6:.1f} MB/s, {link['latency_s'] * 1e3:.2f} ms) "
            f"would take ~{share:.0%} of each step ({grad_bytes / 1e6:.1f} MB of gradients, ~{t:.3f} s against "
            f"{compute_s:.3f} s of compute): try --compress fp16 (half the bytes) or powersgd, --sync-every 8 "
            f"--outer-lr 1 --outer-momentum 0 (local SGD: the parameters averaged every 8 steps; add --sync-overlap "
            f"--sync-delay 2 to hide it), or a larger --batch-size")
