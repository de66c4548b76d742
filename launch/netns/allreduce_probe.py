"""One rank of a two-rank all-reduce over TCP between the emulated hosts: the star that cluster/comm/tcp.py runs
today (rank 1 sends each 4 MB piece to rank 0, which adds and sends it back: one direction at a time) against the
ring of cluster/comm/ring.py (pieces both ways at once, sockets tuned by tune_socket). `ndtrain bench network
--allreduce-mb N` starts one per namespace; it listens only on the private namespace address it is given.

    python -m ndtrain.launch.netns.allreduce_probe --rank 0 --addr 10.213.19.1 --port 29419 --mb 4 \\
        --schedule ring --cc bbr --repeat 3

Prints one JSON line (rank 0): schedule, cc, seconds per all-reduce, the payload rate, and the bytes sent per rank.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time

import numpy as np

from ndtrain.cluster.comm.ring import RingAllreduce, SocketLink, tune_socket

STAR_PIECE_BYTES = 4 << 20  # cluster/comm/tcp.py's DEFAULT_PIECE_BYTES


def private_address(addr: str) -> bool:
    """The probe's unauthenticated listener may only sit on loopback or inside the emulation's namespaces."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.is_loopback or ip in ipaddress.ip_network("10.213.0.0/16")


def connect(rank: int, addr: str, port: int, timeout: float) -> socket.socket:
    """Rank 0 listens on addr:port and accepts rank 1; rank 1 dials until the deadline."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        srv = socket.create_server((addr, port))
        srv.settimeout(timeout)
        s, _ = srv.accept()
        srv.close()
        return s
    while True:
        try:
            return socket.create_connection((addr, port), timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def star(rank: int, link: SocketLink, flat: np.ndarray) -> int:
    """tcp.py's star for two ranks; returns the bytes this rank sent."""
    per = STAR_PIECE_BYTES // flat.itemsize
    tmp = np.empty(per, flat.dtype)
    sent = 0
    for i in range(0, flat.size, per):
        piece = flat[i:i + per]
        if rank == 0:
            t = tmp[:piece.size]
            link.recv_into(memoryview(t).cast("B"))
            piece += t
            link.send(memoryview(piece).cast("B"))
        else:
            link.send(memoryview(piece).cast("B"))
            link.recv_into(memoryview(piece).cast("B"))
        sent += piece.nbytes
    return sent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, choices=(0, 1), required=True)
    p.add_argument("--addr", required=True, help="rank 0's address (it listens there)")
    p.add_argument("--port", type=int, default=29419)
    p.add_argument("--mb", type=float, default=4.0, help="float32 megabytes to all-reduce")
    p.add_argument("--schedule", choices=("star", "ring", "chain"), default="ring")
    p.add_argument("--cc", default="bbr", help="TCP congestion control of the socket")
    p.add_argument("--bdp-bytes", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    if not private_address(a.addr):
        print(f"allreduce_probe: --addr {a.addr}: only loopback or the emulation's private 10.213.0.0/16 (the probe "
              f"is not authenticated)", file=sys.stderr)
        return 2
    s = connect(a.rank, a.addr, a.port, a.timeout)
    tuned = tune_socket(s, a.bdp_bytes, congestion=a.cc)
    peer = 1 - a.rank
    link = SocketLink(s, a.rank, peer, a.timeout)
    n = int(a.mb * (1 << 20)) // 4
    x = np.full(n, a.rank + 1.0, np.float32)
    ring = RingAllreduce(a.rank, 2, link, link, deterministic=a.schedule == "chain")
    times, sent = [], 0
    try:
        for _ in range(a.repeat + 1):  # the first is a warm-up (slow start, buffer growth)
            x.fill(a.rank + 1.0)
            before = ring.counters.bytes_sent
            t0 = time.perf_counter()
            if a.schedule == "star":
                sent = star(a.rank, link, x)
            else:
                ring.allreduce(x)
                sent = ring.counters.bytes_sent - before
            times.append(time.perf_counter() - t0)
            if not (x == 3.0).all():
                raise RuntimeError(f"rank {a.rank}: wrong sum")
    finally:
        ring.close()
        s.close()
    times = times[1:]
    if a.rank == 0:
        best = min(times)
        print(json.dumps({"schedule": a.schedule, "cc": tuned.get("congestion"), "mb": a.mb, "seconds": times,
                          "median_s": sorted(times)[len(times) // 2],
                          "payload_mbit_s": n * 4 * 8 / best / 1e6, "bytes_sent_per_rank": sent}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
