"""Honest communication metrics: what a communicator moved and how long its caller was blocked.

One CommCounters per communicator, updated by the transport itself (a background transport thread included, hence
the lock). Bytes are those this rank sent to / received from other ranks for the collectives:
  measured   socket transports (cluster/comm/ring.py) count what crossed the socket;
  exact      shared memory (shm.py) counts the bytes other ranks read from this rank's slots and this rank read from
             theirs: 2 (W-1)/W x N each way for an all-reduce of N bytes;
  estimated  MPI hides its algorithm: a bandwidth-optimal all-reduce's 2 (W-1)/W x N each way (ring or
             reduce-scatter + all-gather); a star or reduce+broadcast moves more (`estimated` is then True).
payload_bytes counts the bytes handed to collectives (N per all-reduce, whatever the algorithm).
blocked_s is the wall time the caller spent inside blocking collectives and in wait() of non-blocking ones.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


def allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a bandwidth-optimal all-reduce of nbytes over world_size ranks."""
    return 2 * (world_size - 1) * nbytes // world_size if world_size > 1 else 0


class CommCounters:
    FIELDS = ("bytes_sent", "bytes_received", "payload_bytes", "blocked_s", "collectives")

    def __init__(self, estimated: bool = False):
        self.estimated = estimated
        self._lock = threading.Lock()
        self.bytes_sent = self.bytes_received = self.payload_bytes = self.collectives = 0
        self.blocked_s = 0.0

    def add(self, sent: int = 0, received: int = 0, payload: int = 0, blocked_s: float = 0.0,
            collectives: int = 0) -> None:
        with self._lock:
            self.bytes_sent += int(sent)
            self.bytes_received += int(received)
            self.payload_bytes += int(payload)
            self.blocked_s += float(blocked_s)
            self.collectives += int(collectives)

    def collective(self, sent: int, received: int, payload: int, blocked_s: float) -> None:
        """One collective, counted without the lock: for a communicator driven from one thread only (MPI, shared
        memory), where this runs on every all-reduce and a lock would cost a sizeable part of a small one."""
        self.bytes_sent += sent
        self.bytes_received += received
        self.payload_bytes += payload
        self.blocked_s += blocked_s
        self.collectives += 1

    def waited(self, seconds: float) -> None:
        """Time blocked in wait() of a non-blocking collective counted at its launch (one thread, as `collective`)."""
        self.blocked_s += seconds

    @contextmanager
    def blocking(self):
        """Time the enclosed block as blocked in communication."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(blocked_s=time.perf_counter() - t0)

    def snapshot(self) -> dict:
        """The totals so far, as a plain dict (JSON-able); subtract two with `delta`."""
        with self._lock:
            snap = {k: getattr(self, k) for k in self.FIELDS}
        snap["estimated"] = self.estimated
        return snap

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        """The counts between two snapshots (e.g. one training step)."""
        out = {k: after[k] - before[k] for k in CommCounters.FIELDS}
        out["estimated"] = after.get("estimated", False)
        return out


class CommWindow:
    """Per-step communication figures over a logging window of the training loop, leaving out the collectives
    taken aside from training (evaluation, checkpoints), as the loop's time figures do:

        w = CommWindow(comm.counters)          # at the start of a window (and w.reset() after each record)
        w.aside_begin(); evaluate(); w.aside_end()
        record.update(w.per_step(steps_in_window))

    per_step: comm_sent_bytes, comm_recv_bytes (this rank, per step) and comm_blocked_s (time blocked in
    collectives per step, measured by the transport itself: for Ray's shared memory the reduce done inside a
    bucket's launch counts too)."""

    def __init__(self, counters: CommCounters):
        self.counters = counters
        self.reset()

    def reset(self) -> None:
        self._start = self.counters.snapshot()
        self._aside = {k: 0 for k in CommCounters.FIELDS}
        self._aside_start: dict | None = None

    def aside_begin(self) -> None:
        self._aside_start = self.counters.snapshot()

    def aside_end(self) -> None:
        if self._aside_start is not None:
            d = CommCounters.delta(self.counters.snapshot(), self._aside_start)
            for k in CommCounters.FIELDS:
                self._aside[k] += d[k]
            self._aside_start = None

    def per_step(self, steps: int) -> dict:
        d = CommCounters.delta(self.counters.snapshot(), self._start)
        n = max(1, int(steps))
        return {"comm_sent_bytes": (d["bytes_sent"] - self._aside["bytes_sent"]) / n,
                "comm_recv_bytes": (d["bytes_received"] - self._aside["bytes_received"]) / n,
                "comm_blocked_s": max(0.0, d["blocked_s"] - self._aside["blocked_s"]) / n}
