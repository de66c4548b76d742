"""Stall detection by progress, not by time inside a call (issue 19: on a 50 Mbit/s link a 13 MB all-reduce takes
seconds, and a fixed 20 s "blocked in a collective" rule took a slow link for a hang).

Two rules, for the two kinds of transport:
  * a transport that counts bytes as they move (the ring on the TCP mesh: its counters grow piece by piece) is
    stalled only when NO byte has moved for `quiet_s`: ProgressWatch;
  * a transport that says nothing until the call returns (MPI, shared memory) gets a deadline scaled to what is in
    flight: stall_timeout(bytes, bandwidth) = floor_s + slack x bytes / bandwidth, with the bandwidth measured at
    start-up, so a slow link gets proportionally longer before an alarm, and a stuck rank is still caught within
    that bound.
"""
from __future__ import annotations

import time

from .counters import CommCounters


def stall_timeout(bytes_in_flight: int, bandwidth_bytes_per_s: float, floor_s: float = 20.0,
                  slack: float = 4.0) -> float:
    """Seconds a collective moving bytes_in_flight may take before it counts as stuck: the time the link needs at
    the measured bandwidth, times `slack` (loss, congestion, a slower peer), plus a floor for latency and jitter."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s (got {bandwidth_bytes_per_s})")
    return float(floor_s) + float(slack) * max(0, int(bytes_in_flight)) / float(bandwidth_bytes_per_s)


class ProgressWatch:
    """Watches a CommCounters from another thread (a heartbeat or watchdog): quiet() is the time since the byte
    counts last changed, stalled() whether that exceeds quiet_s. Call poll() regularly (each heartbeat)."""

    def __init__(self, counters: CommCounters, quiet_s: float, clock=time.monotonic):
        if quiet_s <= 0:
            raise ValueError(f"quiet_s must be > 0 (got {quiet_s})")
        self.counters, self.quiet_s, self._clock = counters, float(quiet_s), clock
        self._moved = self._bytes()
        self._since = clock()

    def _bytes(self) -> int:
        return self.counters.bytes_sent + self.counters.bytes_received

    def poll(self) -> float:
        """Seconds without progress, as of now (a change of the byte counts restarts the clock)."""
        now, moved = self._clock(), self._bytes()
        if moved != self._moved:
            self._moved, self._since = moved, now
        return now - self._since

    def stalled(self) -> bool:
        return self.poll() > self.quiet_s
