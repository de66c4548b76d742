"""Shared-memory collectives among the processes of one machine (the Ray backend's gradient transport).

Why: on this machine a Ray actor call costs ~1 ms and an object-store all-reduce of 4 MB 17-30 ms, against
0.5-1.9 ms for MPI (ANCHORS §5); gloo needs torch. Processes on one host can instead share a memory-mapped file in
/dev/shm and reduce with NumPy at memory bandwidth, synchronising with flags in the same file.

Layout of the file: a control page (each rank's barrier counter on its own 128-byte line, and an abort word), then
two banks x world_size slots of slot_bytes. One all-reduce of a piece (<= slot_bytes):
  1. copy my piece into my slot of bank b; barrier
  2. reduce my 1/W share of the piece: sum of all slots in rank order 0..W-1 (the same order on every rank, so all
     ranks end with identical bits), written into my own slot at my share's range; barrier
  3. copy every rank's reduced share out of its slot into my piece.
Pieces alternate between the banks, so step 1 of piece k+1 never overwrites a slot another rank is still reading in
step 3 of piece k (they have passed the barrier of k+1 first): two barriers per piece.

Barriers are per-rank counters (one writer each, so no atomics are needed; x86 keeps stores in order, so data
written before a counter is visible once the counter is). Waiting spins, then yields, then sleeps, and gives up
after `timeout` seconds naming the rank it waited for. A rank that fails sets the abort word, so the others stop at
their next wait instead of timing out.

`counters` (counters.CommCounters) counts, exactly, the bytes other ranks read from this rank's slots (sent) and this
rank read from theirs (received): for a piece of n elements and this rank's share of m, n + (W-2) m elements each
way (2 (W-1)/W x N in all for equal shares), and the time spent inside the collectives.
"""
from __future__ import annotations

import mmap
import os
import time

import numpy as np

from .counters import CommCounters

LINE = 16  # int64 words per control line (128 bytes: no false sharing between ranks' counters)
DEFAULT_SLOT_BYTES = 4 << 20


class ShmTimeout(TimeoutError):
    pass


class ShmGroup:
    """rank: this process's index; world_size; path: the /dev/shm file (rank 0 creates it with create=True, the
    others attach after it exists)."""

    def __init__(self, path: str, rank: int, world_size: int, create: bool, slot_bytes: int = DEFAULT_SLOT_BYTES,
                 timeout: float = 60.0):
        self.path, self.rank, self.world_size = path, rank, world_size
        self.slot_bytes = int(slot_bytes) // 64 * 64
        self.timeout = float(timeout)
        ctrl_bytes = (world_size + 1) * LINE * 8
        self._ctrl_bytes = (ctrl_bytes + 4095) // 4096 * 4096
        total = self._ctrl_bytes + 2 * world_size * self.slot_bytes
        if create:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
            os.ftruncate(fd, total)
        else:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fd = os.open(path, os.O_RDWR)
                    if os.fstat(fd).st_size >= total:
                        break
                    os.close(fd)
                except FileNotFoundError:
                    pass
                if time.monotonic() > deadline:
                    raise ShmTimeout(f"rank {rank}: shared-memory file {path} from rank 0 did not appear "
                                     f"within {self.timeout:.0f} s")
                time.sleep(0.01)
        self._mm = mmap.mmap(fd, total)
        os.close(fd)
        self._ctrl = np.frombuffer(self._mm, dtype=np.int64, count=self._ctrl_bytes // 8)
        self._data = np.frombuffer(self._mm, dtype=np.uint8, offset=self._ctrl_bytes)
        self._gen = 0
        self._bank = 0
        self.counters = CommCounters()

    # -- synchronisation -------------------------------------------------------------------------------------------
    def _abort_word(self) -> int:
        return int(self._ctrl[self.world_size * LINE])

    def abort(self) -> None:
        """Make every other rank's next wait raise at once (called by a rank that is about to fail)."""
        self._ctrl[self.world_size * LINE] = self.rank + 1

    def barrier(self) -> None:
        self._gen += 1
        gen = self._gen
        ctrl = self._ctrl
        ctrl[self.rank * LINE] = gen
        for r in range(self.world_size):
            if r == self.rank or ctrl[r * LINE] >= gen:
                continue
            spins = 0
            t0 = time.monotonic()
            while ctrl[r * LINE] < gen:
                spins += 1
                if spins < 2000:
                    continue
                aborted = self._abort_word()
                if aborted:
                    raise RuntimeError(f"rank {self.rank}: rank {aborted - 1} aborted the shared-memory group")
                waited = time.monotonic() - t0
                if waited > self.timeout:
                    raise ShmTimeout(f"rank {self.rank}: waited {waited:.0f} s for rank {r} at shared-memory "
                                     f"barrier {gen} ({self.path}); rank {r} is stuck or dead")
                # spin first (MPI-style busy polling beats ~0.1-1 ms wake-ups here), then back off
                time.sleep(0 if spins < 20000 else 0.0002)

    # -- collectives -------------------------------------------------------------------------------------------------
    def _slot(self, bank: int, rank: int, dtype: np.dtype, n: int) -> np.ndarray:
        off = (bank * self.world_size + rank) * self.slot_bytes
        return self._data[off:off + n * dtype.itemsize].view(dtype)

    def allreduce(self, flat: np.ndarray) -> None:
        """Sum the (N,) contiguous array over ranks, in place."""
        if self.world_size == 1 or flat.size == 0:
            self.counters.collective(0, 0, flat.nbytes, 0.0)
            return
        t0 = time.perf_counter()
        W, dtype = self.world_size, flat.dtype
        moved = 0
        per_piece = self.slot_bytes // dtype.itemsize
        for start in range(0, flat.size, per_piece):
            piece = flat[start:start + per_piece]
            n = piece.size
            bank = self._bank
            self._bank ^= 1
            slots = [self._slot(bank, r, dtype, n) for r in range(W)]
            np.copyto(slots[self.rank], piece)
            self.barrier()
            bounds = [n * r // W for r in range(W + 1)]
            lo, hi = bounds[self.rank], bounds[self.rank + 1]
            moved += n + (W - 2) * (hi - lo)  # others read my piece but my share, then my share W-1 times
            if hi > lo:
                mine = slots[self.rank][lo:hi]
                if self.rank < 2:  # writing into slot 0 or 1 while summing 0 + 1 first is safe elementwise
                    np.add(slots[0][lo:hi], slots[1][lo:hi], out=mine)
                    for r in range(2, W):
                        mine += slots[r][lo:hi]
                else:
                    acc = slots[0][lo:hi] + slots[1][lo:hi]
                    for r in range(2, W):
                        acc += slots[r][lo:hi]
                    np.copyto(mine, acc)
            self.barrier()
            for r in range(W):
                a, b = bounds[r], bounds[r + 1]
                if b > a:
                    np.copyto(piece[a:b], slots[r][a:b])
        moved *= dtype.itemsize
        self.counters.collective(moved, moved, flat.nbytes, time.perf_counter() - t0)

    def broadcast(self, flat: np.ndarray, root: int = 0) -> None:
        if self.world_size == 1 or flat.size == 0:
            return
        t0 = time.perf_counter()
        per_piece = self.slot_bytes // flat.itemsize
        for start in range(0, flat.size, per_piece):
            piece = flat[start:start + per_piece]
            bank = self._bank
            self._bank ^= 1
            slot = self._slot(bank, root, flat.dtype, piece.size)
            if self.rank == root:
                np.copyto(slot, piece)
            self.barrier()
            if self.rank != root:
                np.copyto(piece, slot)
        self.barrier()  # nobody reuses root's slots before everyone has read them
        sent, received = ((self.world_size - 1) * flat.nbytes, 0) if self.rank == root else (0, flat.nbytes)
        self.counters.collective(sent, received, flat.nbytes, time.perf_counter() - t0)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes (each at most slot_bytes - 8): for small records such as pickled dicts."""
        if len(data) > self.slot_bytes - 8:
            raise ValueError(f"rank {self.rank}: allgather record of {len(data)} bytes exceeds the shared-memory "
                             f"slot ({self.slot_bytes - 8} bytes)")
        bank = self._bank
        self._bank ^= 1
        mine = self._slot(bank, self.rank, np.dtype(np.uint8), 8 + len(data))
        mine[:8] = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
        mine[8:] = np.frombuffer(data, np.uint8)
        self.barrier()
        out = []
        for r in range(self.world_size):
            head = self._slot(bank, r, np.dtype(np.uint8), 8)
            n = int(head.view(np.int64)[0])
            out.append(self._slot(bank, r, np.dtype(np.uint8), 8 + n)[8:].tobytes())
        self.barrier()
        return out

    def unlink(self) -> None:
        """Remove the file name (mappings stay valid): call once every rank has attached."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._ctrl = self._data = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
