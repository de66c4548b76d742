"""All-gather of one NumPy array per rank, on any Communicator (compressed gradient payloads, per-rank checkpoint
state).

    parts = allgather_array(comm, x)      # x: (N,) the same shape and dtype on every rank -> (W, N), rank order

Where the transport has a byte all-gather (MPI's Allgather, the Ray groups' allgather_bytes) the payload's own bytes
travel; otherwise each rank writes x into its row of a zero (W, N) buffer and the buffer is all-reduced: x + 0 is x
exactly, so the gathered rows are bitwise the ranks' arrays (a float -0.0 comes back +0.0). Every rank receives
the same rows, so anything computed from them in rank order is the same on every rank.
"""
from __future__ import annotations

import time

import numpy as np


def allgather_array(comm, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(-1)
    world = comm.world_size
    if world == 1:
        return x[None].copy()
    mpi = getattr(comm, "comm", None)
    if mpi is not None and hasattr(mpi, "Allgather"):  # MPICommunicator: the payload's bytes, one MPI call
        out = np.empty((world, x.size), dtype=x.dtype)
        t0 = time.perf_counter()
        mpi.Allgather(x.view(np.uint8), out.view(np.uint8))
        _count(comm, x.nbytes * (world - 1), time.perf_counter() - t0)
        return out
    group = getattr(comm, "group", None)
    if group is not None and hasattr(group, "allgather_bytes"):  # Ray: shared memory or the TCP mesh
        parts = group.allgather_bytes(x.tobytes())
        return np.stack([np.frombuffer(p, dtype=x.dtype) for p in parts])
    rows = np.zeros((world, x.size), dtype=x.dtype if x.dtype.kind in "fiu" else np.uint8)
    rows[comm.rank] = x
    comm.allreduce(rows.reshape(-1))
    return rows


def _count(comm, nbytes: int, seconds: float) -> None:
    counters = getattr(comm, "counters", None)
    if counters is not None:
        counters.collective(nbytes, nbytes, nbytes, seconds)
