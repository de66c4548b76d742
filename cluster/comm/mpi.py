"""MPI communicator: mpi4py on raw buffers (no pickling on the hot path).

Large all-reduces are cut into pieces of `chunk_bytes` (default 8 MB): in both MPI wheels measured here a single
Allreduce of >= 32 MB ran at ~1.6-2 GB/s (per-call temporaries served by fresh mmap, page-faulted every call) while
1-16 MB pieces ran at 3.6-6.6 GB/s (ANCHORS §4c). Pieces of one iallreduce are all in flight at once, so Open MPI's
libnbc progresses them while the caller computes.

`counters` (counters.CommCounters, estimated=True): MPI does not say which algorithm it ran, so the bytes are those
of a bandwidth-optimal all-reduce, 2 (W-1)/W x N each way (Open MPI's choice for few ranks may move more); the time
blocked is measured: inside blocking calls and inside handle.wait().
"""
from __future__ import annotations

from typing import Any

import numpy as np

import time

from .base import Communicator, Handle
from .counters import CommCounters, allreduce_bytes

DEFAULT_CHUNK_BYTES = 8 << 20


def _flat_view(buf: np.ndarray, what: str) -> np.ndarray:
    """(N,) view of a C-contiguous array; MPI works on its memory directly, so a copy would lose the result."""
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise ValueError(f"{what}: buffer must be a C-contiguous numpy array (got {type(buf).__name__}, "
                         f"contiguous={getattr(getattr(buf, 'flags', None), 'c_contiguous', None)})")
    return buf.reshape(-1)


def chunk_slices(n: int, itemsize: int, chunk_bytes: int) -> list[slice]:
    """Contiguous pieces of at most chunk_bytes covering [0, n) (at least one element per piece)."""
    step = max(1, chunk_bytes // max(1, itemsize))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)] or [slice(0, 0)]


class MPIHandle(Handle):
    def __init__(self, requests: list, counters: CommCounters | None = None):
        self._requests = requests
        self._counters = counters

    def wait(self) -> None:
        if self._requests:
            from mpi4py import MPI  # mpi4py: importing it initialises MPI, which only MPI ranks may do
            t0 = time.perf_counter()
            MPI.Request.Waitall(self._requests)
            self._requests = []
            if self._counters is not None:
                self._counters.waited(time.perf_counter() - t0)


class MPICommunicator(Communicator):
    """comm: an mpi4py communicator (default COMM_WORLD). chunk_bytes: largest single MPI call."""

    def __init__(self, comm=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        from mpi4py import MPI  # mpi4py: importing it initialises MPI, which only MPI ranks may do
        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        # Open MPI's libnbc progresses an Iallreduce while the caller computes (40-57% hidden here); MPICH without a
        # progress thread does not, and MPICH_ASYNC_PROGRESS=1 costs more than it hides on 2 cores (ANCHORS 4d).
        self.overlaps_compute = "Open MPI" in MPI.Get_library_version()
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.chunk_bytes = int(chunk_bytes)
        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM
        self.counters = CommCounters(estimated=True)

    def allreduce(self, buf: np.ndarray) -> None:
        if self.world_size == 1:
            self.counters.collective(0, 0, buf.nbytes, 0.0)
            return
        t0 = time.perf_counter()
        self._allreduce(buf)
        moved = allreduce_bytes(buf.nbytes, self.world_size)
        self.counters.collective(moved, moved, buf.nbytes, time.perf_counter() - t0)

    def _allreduce(self, buf: np.ndarray) -> None:
        if buf.nbytes <= self.chunk_bytes:
            # The common small case: one call, no slicing, and no contiguity probe of our own (it costs ~0.1 us of a
            # 2 us 4 KB all-reduce): mpi4py refuses a non-contiguous buffer itself; we only name the rank.
            try:
                self.comm.Allreduce(self._in_place, buf, self._sum)
            except (BufferError, ValueError):
                _flat_view(buf, f"MPICommunicator.allreduce on rank {self.rank}")
                raise
            return
        flat = _flat_view(buf, f"MPICommunicator.allreduce on rank {self.rank}")
        MPI = self._MPI
        for s in chunk_slices(flat.size, flat.itemsize, self.chunk_bytes):
            self.comm.Allreduce(MPI.IN_PLACE, flat[s], op=MPI.SUM)

    def iallreduce(self, buf: np.ndarray) -> Handle:
        if self.world_size == 1:
            self.counters.collective(0, 0, buf.nbytes, 0.0)
            return MPIHandle([])
        flat = _flat_view(buf, f"MPICommunicator.iallreduce on rank {self.rank}")
        MPI = self._MPI
        t0 = time.perf_counter()
        reqs = [self.comm.Iallreduce(MPI.IN_PLACE, flat[s], op=MPI.SUM)
                for s in chunk_slices(flat.size, flat.itemsize, self.chunk_bytes)]
        moved = allreduce_bytes(flat.nbytes, self.world_size)
        self.counters.collective(moved, moved, flat.nbytes, time.perf_counter() - t0)  # the launch blocks too
        return MPIHandle(reqs, self.counters)

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.world_size == 1:
            return
        flat = _flat_view(buf, f"MPICommunicator.broadcast on rank {self.rank}")
        t0 = time.perf_counter()
        for s in chunk_slices(flat.size, flat.itemsize, self.chunk_bytes):
            self.comm.Bcast(flat[s], root=root)
        # estimated as a tree/pipeline: every rank but the root receives N, and N leaves the root
        sent, received = (flat.nbytes, 0) if self.rank == root else (0, flat.nbytes)
        self.counters.collective(sent, received, flat.nbytes, time.perf_counter() - t0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather_obj(self, obj: Any) -> list:
        return self.comm.allgather(obj)  # pickle-based: small records, off the hot path

    def abort(self, code: int = 1) -> None:
        """End every rank now (a rank that cannot continue must not leave the others blocked in a collective)."""
        self.comm.Abort(code)
