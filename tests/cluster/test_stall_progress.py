"""Stall detection by progress (cluster/comm/progress.py): a slow-but-moving all-reduce (a throttled link) never
looks stalled; a stuck one does, within the bound; the MPI-style deadline scales with the bytes in flight."""
import socket
import threading
import time

import numpy as np
import pytest

from ndtrain.cluster.comm.counters import CommCounters
from ndtrain.cluster.comm.progress import ProgressWatch, stall_timeout
from ndtrain.cluster.comm.ring import RingAllreduce, SocketLink


class ThrottledLink(SocketLink):
    """Sends in 4 KB slices with a pause after each: ~80 KB/s, far slower than the watch's quiet time per piece
    of the all-reduce, but never quiet for long."""

    def send(self, view):
        for i in range(0, len(view), 4096):
            super().send(view[i:i + 4096])
            time.sleep(0.05)


def watch_while(fn, counters, quiet_s):
    """Run fn in a thread, polling a ProgressWatch every 20 ms; returns (worst quiet time seen, fn's error)."""
    w = ProgressWatch(counters, quiet_s)
    err = []

    def body():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    t = threading.Thread(target=body)
    t.start()
    worst = 0.0
    while t.is_alive():
        worst = max(worst, w.poll())
        time.sleep(0.02)
    t.join()
    return worst, w, err


def test_a_slow_but_moving_allreduce_is_not_a_stall():
    a0, b1 = socket.socketpair()
    a1, b0 = socket.socketpair()
    rings = [RingAllreduce(0, 2, ThrottledLink(a0, 0, 1, 10), SocketLink(b0, 0, 1, 10), deterministic=True,
                           piece_bytes=16 << 10),
             RingAllreduce(1, 2, ThrottledLink(a1, 1, 0, 10), SocketLink(b1, 1, 0, 10), deterministic=True,
                           piece_bytes=16 << 10)]
    xs = [np.full(40_000, r + 1.0, np.float32) for r in range(2)]  # 160 KB: ~2 s at the throttled rate
    other = threading.Thread(target=rings[1].allreduce, args=(xs[1],))
    other.start()
    t0 = time.monotonic()
    worst, _, err = watch_while(lambda: rings[0].allreduce(xs[0]), rings[0].counters, quiet_s=1.0)
    took = time.monotonic() - t0
    other.join(30)
    assert not err, err
    assert (xs[0] == 3).all() and (xs[1] == 3).all()
    assert took > 1.0  # longer than the quiet time: a fixed "time inside the call" rule would have fired
    assert worst < 1.0  # bytes kept moving (a piece every ~0.2 s): never quiet for long
    for r in rings:
        r.close()
    for s in (a0, b1, a1, b0):
        s.close()


def test_a_stuck_allreduce_is_a_stall_within_the_bound():
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    ring = RingAllreduce(0, 2, SocketLink(a, 0, 1, 1.5), SocketLink(d, 0, 1, 1.5), deterministic=True)
    t0 = time.monotonic()
    flagged = []
    w = ProgressWatch(ring.counters, quiet_s=0.3)

    def watchdog():
        while not flagged and time.monotonic() - t0 < 5:
            if w.stalled():
                flagged.append(time.monotonic() - t0)
            time.sleep(0.02)

    t = threading.Thread(target=watchdog)
    t.start()
    with pytest.raises(TimeoutError, match="rank 1"):  # the peer never sends: the link's own timeout ends it
        ring.allreduce(np.ones(1000, np.float32))
    t.join()
    assert flagged and 0.3 < flagged[0] < 1.2  # the watch saw the stall before the link's own 1.5 s timeout
    ring.close()
    for s in (a, b, c, d):
        s.close()


def test_watch_restarts_on_any_byte():
    now = [0.0]
    c = CommCounters()
    w = ProgressWatch(c, quiet_s=2.0, clock=lambda: now[0])
    now[0] = 1.5
    assert w.poll() == 1.5 and not w.stalled()
    c.add(received=1)
    assert w.poll() == 0.0
    now[0] = 4.0
    assert w.stalled()
    with pytest.raises(ValueError, match="quiet_s"):
        ProgressWatch(c, 0)


def test_stall_timeout_scales_with_the_bytes_in_flight():
    # 13 MB of gradients on poor Wi-Fi (~45 Mbit/s with BBR = 5.6 MB/s): a 20 s fixed rule fired at step 0
    poor = stall_timeout(13 << 20, 45e6 / 8)
    assert poor > 20 + 4 * 2.4  # the floor plus four times the ~2.4 s transfer
    assert stall_timeout(0, 1e6) == 20.0
    assert stall_timeout(1 << 20, 1e9, floor_s=5, slack=2) == pytest.approx(5 + 2 * (1 << 20) / 1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        stall_timeout(1, 0)
