"""All-gather of one NumPy array per rank, on any Communicator (compressed gradient payloads, per-rank checkpoint
state).

    parts = allgather_array(comm, x)      # x: (N,) the same shape and dtype on every rank -> (W, N), rank order
    h = iallgather_array(comm, x); parts = h.wait()    # the same, started now and done in the background if it can

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
    if group is not None and hasattr(group, "allgather_array"):  # the TCP mesh: a ring all-gather
        return group.allgather_array(x)
    if group is not None and hasattr(group, "allgather_bytes"):  # Ray: shared memory or the TCP mesh
        parts = group.allgather_bytes(x.tobytes())
        return np.stack([np.frombuffer(p, dtype=x.dtype) for p in parts])
    rows = np.zeros((world, x.size), dtype=x.dtype if x.dtype.kind in "fiu" else np.uint8)
    rows[comm.rank] = x
    comm.allreduce(rows.reshape(-1))
    return rows


class _Done:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


class _MPIGather:
    def __init__(self, comm, req, out, nbytes: int, t0: float):
        self.comm, self.req, self.out, self.nbytes, self.t0 = comm, req, out, nbytes, t0

    def wait(self) -> np.ndarray:
        if self.req is not None:
            t1 = time.perf_counter()
            self.req.Wait()
            self.req = None
            _count(self.comm, self.nbytes, time.perf_counter() - t1)
        return self.out


def iallgather_array(comm, x: np.ndarray):
    """Start allgather_array(comm, x); handle.wait() returns the (W, N) rows. In the background where the transport
    can (MPI's Iallgather; the TCP mesh's ring, on its transport thread), else done at once."""
    x = np.array(x, copy=True).reshape(-1)  # the caller may reuse its array while this is in flight
    if comm.world_size == 1:
        return _Done(x[None])
    mpi = getattr(comm, "comm", None)
    if mpi is not None and hasattr(mpi, "Iallgather"):
        out = np.empty((comm.world_size, x.size), dtype=x.dtype)
        t0 = time.perf_counter()
        req = mpi.Iallgather(x.view(np.uint8), out.view(np.uint8))
        return _MPIGather(comm, req, out, x.nbytes * (comm.world_size - 1), t0)
    group = getattr(comm, "group", None)
    if group is not None and hasattr(group, "iallgather_array"):
        return group.iallgather_array(x)
    return _Done(allgather_array(comm, x))


def _count(comm, nbytes: int, seconds: float) -> None:
    counters = getattr(comm, "counters", None)
    if counters is not None:
        counters.collective(nbytes, nbytes, nbytes, seconds)
