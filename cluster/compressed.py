"""The gradient reducer's compressed exchange (cluster.compress): fewer bytes per step, the same parameters on
every rank.

    ex = CompressedExchange(comm, store, buckets, "fp16")   # or "bf16", "powersgd" (rank r)
    ex.reduce()           # after backward: store.grad = the (decompressed) SUM over ranks, bitwise equal everywhere

fp16 / bf16: each rank compresses its bucket (gradient + its error-feedback residual, cluster/compress.py) to 2 bytes
a value; the payloads are all-gathered (cluster/comm/gather.py) and every rank adds the decoded payloads in rank
order (compress.sum_decoded). Every rank adds the same payloads in the same order: the same bits everywhere. (An
fp16 sum along a ring would round again at every hop.)

powersgd: each 2-D (or higher, flattened to (shape[0], rest)) parameter of a bucket is sent as P = M Q (n, r), then
Q' = M^T P_hat (m, r) (Vogels et al. 2019); a bucket's P's and its 1-D parameters (biases, norms: sent whole, as
DDP's powerSGD_hook does) share one all-reduce, its Q's a second. Each sum is the transport's all-reduce, which is
the same on every rank, and every rank decompresses the same sums. A matrix too small to gain ((n + m) r >= n m)
is sent whole too.

Error-feedback residuals are per rank (each rank's own rounding): state_dict() / load_state_dict() carry them for
checkpoints (cluster/checkpoint_meta.py saves every rank's), so a resumed run continues bitwise.
"""
from __future__ import annotations

import numpy as np

from ndtrain.cluster.comm.gather import allgather_array
from ndtrain.cluster.compress import HalfCompressor, PowerSGD, make_compressor, sum_decoded


class CompressedExchange:
    def __init__(self, comm, store, buckets, scheme: str, powersgd_rank: int = 2, seed: int = 0):
        self.comm, self.store, self.buckets, self.scheme = comm, store, buckets, scheme
        self.compressor = make_compressor(scheme, powersgd_rank=powersgd_rank, seed=seed)
        params = dict(store.params)
        # per bucket: [(name, lo, hi, (n, m) or None)] with offsets into store.grad; None: sent whole
        self.layout = []
        for b in buckets:
            rows = []
            for name in b.names:
                p = params[name]
                shape = (p.shape[0], p.size // p.shape[0]) if len(p.shape) >= 2 else None
                if shape is not None and isinstance(self.compressor, PowerSGD):
                    if self.compressor.wire_values(shape) >= p.size:
                        shape = None
                rows.append((name, p.offset, p.offset + p.size, shape))
            self.layout.append(rows)

    def reduce(self) -> None:
        """store.grad = the sum over ranks of every rank's decompressed gradient (error feedback applied)."""
        for i, b in enumerate(self.buckets):
            if isinstance(self.compressor, HalfCompressor):
                self._half(i, b)
            else:
                self._powersgd(i)

    def _half(self, i: int, b) -> None:
        g = self.store.grad[b.lo:b.hi]
        if np.isfinite(g).all():
            payload = self.compressor.compress(i, g)  # (N,) 2 bytes a value
        else:  # saturating would hide it: send NaN, so every rank sees a non-finite sum and skips the step alike
            payload = self.compressor.encode(np.full(g.shape, np.nan, dtype=np.float32))
        wire = payload.view(np.uint16)
        parts = allgather_array(self.comm, wire)  # (W, N)
        dtype = payload.dtype
        tmp = np.empty(g.shape, dtype=np.float32)
        sum_decoded([p.view(dtype) for p in parts], self.compressor.decode, tmp)
        g[...] = tmp

    def _powersgd(self, i: int) -> None:
        ps, grad = self.compressor, self.store.grad
        rows = self.layout[i]
        mats = [(n, lo, hi, s) for n, lo, hi, s in rows if s is not None]
        whole = [(lo, hi) for _, lo, hi, s in rows if s is None]
        r_of = {n: min(ps.rank, *s) for n, _, _, s in mats}
        # round 1: the P's and the uncompressed parameters, one all-reduce
        n1 = sum(s[0] * r_of[n] for n, _, _, s in mats) + sum(hi - lo for lo, hi in whole)
        buf = np.empty(n1, dtype=np.float32)
        k = 0
        for n, lo, hi, s in mats:
            p = ps.p(n, grad[lo:hi].reshape(s).astype(np.float32))
            buf[k:k + p.size] = p.reshape(-1)
            k += p.size
        for lo, hi in whole:
            buf[k:k + hi - lo] = grad[lo:hi]
            k += hi - lo
        self.comm.allreduce(buf)
        k = 0
        qs = []
        for n, lo, hi, s in mats:
            size = s[0] * r_of[n]
            qs.append(ps.q(n, buf[k:k + size].reshape(s[0], r_of[n])))
            k += size
        for lo, hi in whole:
            grad[lo:hi] = buf[k:k + hi - lo]
            k += hi - lo
        if not mats:
            return
        # round 2: the Q's
        qbuf = np.concatenate([q.reshape(-1) for q in qs]).astype(np.float32)
        self.comm.allreduce(qbuf)
        k = 0
        for n, lo, hi, s in mats:
            size = s[1] * r_of[n]
            d = ps.decompress(n, qbuf[k:k + size].reshape(s[1], r_of[n]))
            grad[lo:hi] = d.reshape(-1)
            k += size

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.compressor.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.compressor.load_state_dict(state)
