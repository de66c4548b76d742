"""DiLoCo's outer-gradient exchange (cluster/local_sgd.py): the sum over ranks of each rank's (P,) outer gradient, in
chunks that can be started a few at a time while inner steps run.

    ex = OuterExchange(comm, size=P, scheme="", chunk_bytes=1 << 20)   # scheme "" (float), "fp16" or "bf16"
    pending = ex.start(delta, per_step=2)    # delta: (P,), owned by the exchange from now; queues 2 chunks
    pending.advance()                        # after each inner step: queue the next per_step chunks
    total = pending.result()                 # queue the rest, wait: (P,) the sum over ranks, bitwise equal everywhere

Plain: each chunk is an in-place iallreduce (the transport's sum: the TCP mesh's chain in rank order, MPI's
Iallreduce; shared memory and one rank do it at once). A chunk is queued only at a step boundary, the same on every
rank, so a small blocking collective between two steps (the loop's stop votes and window sums) waits for the chunks
queued so far, not for the whole outer gradient (the TCP ring runs collectives in order).

fp16 / bf16: each chunk is compressed with error feedback on this rank's residual (cluster/compress.py, keyed by
chunk) when the exchange starts, its 2-byte payloads are all-gathered (cluster/comm/gather.py: iallgather_array, the
ring all-gather on the TCP mesh), and every rank adds the decoded payloads in rank order: the same bits everywhere,
and half the bytes. The residuals are per rank: state_dict() / load_state_dict() for checkpoints.
"""
from __future__ import annotations

import math

import numpy as np

from ndtrain.cluster.comm.gather import iallgather_array
from ndtrain.cluster.compress import HalfCompressor, sum_decoded


class OuterExchange:
    def __init__(self, comm, size: int, scheme: str = "", chunk_bytes: int = 1 << 20):
        if scheme not in ("", "fp16", "bf16"):
            raise ValueError(f"DiLoCo's outer gradient goes as float, fp16 or bf16 (got {scheme!r})")
        self.comm, self.size, self.scheme = comm, int(size), scheme
        self.compressor = HalfCompressor(scheme) if scheme else None
        per = max(1, int(chunk_bytes) // 4)
        self.chunks = [(lo, min(self.size, lo + per)) for lo in range(0, self.size, per)] or [(0, 0)]

    def start(self, delta: np.ndarray, per_step: int | None = None) -> "PendingSum":
        """Start the exchange of delta (P,); per_step chunks now and after each advance() (None: all now)."""
        return PendingSum(self, delta, per_step or len(self.chunks))

    def per_step(self, steps: int) -> int:
        """Chunks to queue per step so that all are queued within `steps` steps."""
        return max(1, math.ceil(len(self.chunks) / max(1, steps)))

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.compressor.state_dict() if self.compressor is not None else {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.compressor is not None:
            self.compressor.load_state_dict(state)


class PendingSum:
    """One exchange in flight; see OuterExchange."""

    def __init__(self, ex: OuterExchange, delta: np.ndarray, per_step: int):
        self.ex, self.buf, self.per_step = ex, delta, max(1, int(per_step))
        self.next = 0
        self.handles: list = []
        self.payloads = None
        if ex.compressor is not None:  # error feedback at the start: the residual is this rank's, now
            self.payloads = [ex.compressor.compress(i, delta[lo:hi]) for i, (lo, hi) in enumerate(ex.chunks)]
        self.advance()

    @classmethod
    def done(cls, total: np.ndarray) -> "PendingSum":
        """An exchange whose sum is known (restored from a checkpoint)."""
        p = cls.__new__(cls)
        p.ex, p.buf, p.per_step, p.next, p.handles, p.payloads = None, total, 1, 0, [], None
        return p

    def advance(self) -> None:
        if self.ex is None:
            return
        comm, chunks = self.ex.comm, self.ex.chunks
        for i in range(self.next, min(len(chunks), self.next + self.per_step)):
            lo, hi = chunks[i]
            if self.payloads is None:
                self.handles.append(comm.iallreduce(self.buf[lo:hi]))
            else:
                p = self.payloads[i]
                self.handles.append(iallgather_array(comm, p.view(np.uint16)))
        self.next = min(len(chunks), self.next + self.per_step)

    def result(self) -> np.ndarray:
        """(P,) the sum over ranks (waits; queues the chunks not yet started)."""
        if self.ex is None:
            return self.buf
        while self.next < len(self.ex.chunks):
            self.advance()
        comp = self.ex.compressor
        for i, h in enumerate(self.handles):
            rows = h.wait()
            if comp is not None:
                lo, hi = self.ex.chunks[i]
                dtype = self.payloads[i].dtype
                tmp = np.empty(hi - lo, dtype=np.float32)
                sum_decoded([row.view(dtype) for row in rows], comp.decode, tmp)
                self.buf[lo:hi] = tmp
        self.ex, self.handles, self.payloads = None, [], None
        return self.buf
