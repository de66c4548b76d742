"""Gradient compression with error feedback: fewer bytes on a slow link, and no bias over steps.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): each rank keeps, per bucket, the residual e of
what compression lost, and adds it to the next step's gradient before compressing:
    M_t = g_t + e_t;   D_t = decompress(compress(M_t));   e_{t+1} = M_t - D_t
so sum_t D_t = sum_t g_t - e_T: over steps nothing is lost but the last residual. The residuals (and PowerSGD's warm
start) are plain float32 arrays keyed by bucket, in state_dict() / load_state_dict(), for checkpoints.

Formats (per rank; the transport then sums the ranks' decompressed D_i, e.g. all-gather the payloads and add them
in rank order with sum_decoded, which gives the same bits on every rank):
  fp16       IEEE half (NumPy's round-to-nearest-even cast); values beyond +-65504 saturate, and error feedback
             carries the excess to later steps rather than sending inf. 2 bytes per value.
  bf16       the top 16 bits of float32, rounded to nearest even (the float32 range, 8 mantissa bits): 2 bytes.
  PowerSGD   (Vogels, Karimireddy & Jaggi 2019, Algorithm 1 with error feedback): a 2-D block M (n, m) is sent as
             P = M Q (n, r) and Q' = M^T P_hat (m, r), r << min(n, m): (n + m) r values instead of n m. Two rounds,
             each an all-reduce (sum) across ranks:
                 p = ps.p(key, g)                # (n, r) = (g + e) Q, Q warm-started from the last step
                 q = ps.q(key, allreduce(p))     # orthogonalise the summed P, q = M^T P_hat (m, r)
                 D = ps.decompress(key, allreduce(q))   # P_hat q_sum^T (n, m): the sum over ranks
             Each rank's residual is e = M - P_hat (M^T P_hat)^T, its own M minus its share of the decompressed
             sum (the paper's local decompression), so the error-feedback identity holds per rank.
"""
from __future__ import annotations

import zlib

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
BF16_MAX_BITS = 0x7F7F                      # the largest finite bf16 (3.3895e38)


# -- bf16 in NumPy ------------------------------------------------------------------------------------------------------
def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 (N,) -> uint16 (N,): round to nearest, ties to even, on the float32 bits. NaN stays a (quiet) NaN;
    finite values that round past the largest bf16 become inf (IEEE overflow)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # the carry could turn a NaN's payload into inf: keep it a NaN (sign kept)
        out[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return out


def bf16_decode(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 (N,) -> float32 (N,), exact (bf16 is a prefix of float32)."""
    wide = u.astype(np.uint32) << np.uint32(16)
    if out is None:
        return wide.view(np.float32)
    out[...] = wide.view(np.float32)
    return out


BF16_MAX = float(np.array([BF16_MAX_BITS << 16], np.uint32).view(np.float32)[0])


def _bf16_saturate(x: np.ndarray) -> np.ndarray:
    """Clamp finite values to the largest finite bf16, which rounding keeps finite (error feedback carries the
    rest)."""
    return np.clip(x, -BF16_MAX, BF16_MAX)


# -- error feedback -----------------------------------------------------------------------------------------------------
class ErrorFeedback:
    """Per-bucket residuals: float32 arrays keyed by bucket (a name or an index)."""

    def __init__(self):
        self.residual: dict[str, np.ndarray] = {}

    def corrected(self, key, g: np.ndarray) -> np.ndarray:
        """g + e (a new float32 array; g is not modified). A bucket whose shape changed starts from zero."""
        e = self.residual.get(str(key))
        if e is None or e.shape != g.shape:
            return np.array(g, dtype=np.float32, copy=True)
        return g.astype(np.float32) + e

    def keep(self, key, m: np.ndarray, decompressed: np.ndarray) -> None:
        e = (m - decompressed).astype(np.float32, copy=False)
        # a non-finite gradient (a step the worker will skip) must not poison every later step of this bucket
        self.residual[str(key)] = e if np.isfinite(e).all() else np.zeros_like(e)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"residual/{k}": v.copy() for k, v in self.residual.items()}

    def load_residuals(self, state: dict[str, np.ndarray]) -> None:
        self.residual = {k[len("residual/"):]: np.array(v, dtype=np.float32)
                         for k, v in state.items() if k.startswith("residual/")}


class HalfCompressor:
    """fp16 or bf16 with error feedback. compress(key, g) -> uint16/float16 payload (N,), 2 bytes per value;
    decode(payload) -> float32 (N,)."""

    FORMATS = ("fp16", "bf16")

    def __init__(self, fmt: str):
        if fmt not in self.FORMATS:
            raise ValueError(f"compression format must be one of {', '.join(self.FORMATS)} (got {fmt!r})")
        self.fmt = fmt
        self.ef = ErrorFeedback()

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self.fmt == "fp16":
            return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16)
        return bf16_encode(_bf16_saturate(x))

    def decode(self, payload: np.ndarray) -> np.ndarray:
        if self.fmt == "fp16":
            return payload.astype(np.float32)
        return bf16_decode(payload)

    def compress(self, key, g: np.ndarray) -> np.ndarray:
        """The payload for this step's gradient g of bucket `key`; the residual is updated."""
        m = self.ef.corrected(key, g)
        payload = self.encode(m)
        self.ef.keep(key, m, self.decode(payload))
        return payload

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.ef.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ef.load_residuals(state)


def sum_decoded(payloads: list[np.ndarray], decode, out: np.ndarray) -> np.ndarray:
    """out = decode(p_0) + decode(p_1) + ... in rank order (float32): the same bits on every rank that holds the
    same payloads (an all-gather of compressed buckets, then this)."""
    out[...] = decode(payloads[0])
    for p in payloads[1:]:
        out += decode(p)
    return out


# -- PowerSGD -----------------------------------------------------------------------------------------------------------
def orthogonalize(p: np.ndarray) -> np.ndarray:
    """(n, r) -> (n, r) with orthonormal columns spanning p's (reduced QR; column signs fixed so that R's diagonal
    is >= 0, a function of p alone). Columns of a rank-deficient p come back orthonormal all the same."""
    qm, r = np.linalg.qr(p.astype(np.float64), mode="reduced")
    sign = np.where(np.diag(r) < 0, -1.0, 1.0)
    return (qm * sign).astype(np.float32)


class PowerSGD:
    """Rank-r compression of 2-D gradient blocks with warm start and error feedback (see the module docstring).
    seed: the initial Q of each bucket, the same on every rank (drawn from seed and the bucket key)."""

    def __init__(self, rank: int = 2, seed: int = 0):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1 (got {rank})")
        self.rank, self.seed = int(rank), int(seed)
        self.ef = ErrorFeedback()
        self.q_warm: dict[str, np.ndarray] = {}
        self._m: dict[str, np.ndarray] = {}      # this step's M = g + e, between p() and q()
        self._p_hat: dict[str, np.ndarray] = {}  # between q() and decompress()

    def wire_values(self, shape: tuple[int, int]) -> int:
        n, m = shape
        r = min(self.rank, n, m)
        return (n + m) * r

    def _initial_q(self, key: str, m: int, r: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        return rng.standard_normal((m, r)).astype(np.float32)

    def p(self, key, g: np.ndarray) -> np.ndarray:
        """g: (n, m) float32 -> P = (g + e) Q: (n, r), to be summed over ranks."""
        if g.ndim != 2:
            raise ValueError(f"PowerSGD bucket {key}: needs a 2-D block, got shape {g.shape}")
        key = str(key)
        n, m = g.shape
        r = min(self.rank, n, m)
        q = self.q_warm.get(key)
        if q is None or q.shape != (m, r):
            q = self._initial_q(key, m, r)
        mat = self.ef.corrected(key, g)
        self._m[key] = mat
        self.q_warm[key] = q
        return mat @ q

    def q(self, key, p_sum: np.ndarray) -> np.ndarray:
        """p_sum: (n, r), the sum of every rank's P -> this rank's M^T P_hat: (m, r), to be summed over ranks."""
        key = str(key)
        mat = self._m.pop(key)
        p_hat = orthogonalize(p_sum)
        q_local = mat.T @ p_hat
        self.ef.keep(key, mat, p_hat @ q_local.T)  # this rank's share of the decompressed sum
        self._p_hat[key] = p_hat
        return q_local

    def decompress(self, key, q_sum: np.ndarray) -> np.ndarray:
        """q_sum: (m, r), the sum of every rank's Q -> the decompressed sum over ranks P_hat q_sum^T: (n, m). q_sum
        is the next step's warm start (the same on every rank)."""
        key = str(key)
        p_hat = self._p_hat.pop(key)
        self.q_warm[key] = np.array(q_sum, dtype=np.float32)
        return p_hat @ q_sum.T

    def roundtrip(self, key, g: np.ndarray) -> np.ndarray:
        """One rank alone (world size 1): the three phases with identity all-reduces."""
        return self.decompress(key, self.q(key, self.p(key, g)))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**self.ef.state_dict(), **{f"q/{k}": v.copy() for k, v in self.q_warm.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.ef.load_residuals(state)
        self.q_warm = {k[2:]: np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith("q/")}


def make_compressor(name: str, powersgd_rank: int = 2, seed: int = 0):
    """'fp16' | 'bf16' -> HalfCompressor; 'powersgd' -> PowerSGD."""
    if name in HalfCompressor.FORMATS:
        return HalfCompressor(name)
    if name == "powersgd":
        return PowerSGD(rank=powersgd_rank, seed=seed)
    raise ValueError(f"compression must be one of fp16, bf16, powersgd (got {name!r})")
