"""Small pure functions with their shape contracts: the math layers call, each tested alone.

Forward and backward sit side by side so one can be read against the other. No state, no Param: layers own those.
"""
from __future__ import annotations

import math

import numpy as np

# A large finite negative for masked attention scores: a fully masked row gives a uniform softmax over garbage that
# callers zero out, never NaN (which -inf would give: exp(-inf - -inf)).
MASK_VALUE = -1e9


# Row reductions over the last axis go through BLAS gemv (a (N, D) @ (D,) product): 2-5x faster than
# ndarray.sum/mean over the last axis at D = 128..1024 (NumPy's pairwise reduction pays per-row overhead on short
# rows), with the same float32 accuracy (blocked partial sums).
def _row_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a: (..., D), w: (D,) -> (..., 1) = sum_d a[..., d] w[d]."""
    D = a.shape[-1]
    return (a.reshape(-1, D) @ w).reshape(a.shape[:-1] + (1,))


def row_sum(a: np.ndarray) -> np.ndarray:
    """a: (..., D) -> (..., 1) sum over the last axis, as one gemv."""
    return _row_dot(a, np.ones(a.shape[-1], dtype=a.dtype))


def row_mean(a: np.ndarray) -> np.ndarray:
    """a: (..., D) -> (..., 1) mean over the last axis, as one gemv."""
    D = a.shape[-1]
    return _row_dot(a, np.full(D, 1.0 / D, dtype=a.dtype))


def col_sum(a: np.ndarray) -> np.ndarray:
    """a: (..., D) -> (D,) sum over every axis but the last (bias and norm-parameter gradients), as one gemv with
    a ones vector."""
    a2 = a.reshape(-1, a.shape[-1])
    return np.ones(a2.shape[0], dtype=a.dtype) @ a2


# Row-vector broadcasts ((N, D) op (D,): biases, LayerNorm's gamma and beta) run NumPy's inner loop once per row,
# D elements at a time: ~2x the time of a same-shape op at D = 128..256. Viewing R rows as one row of R*D elements
# against the vector tiled R times makes the inner loop long again.
ROW_TILE_ELEMS = 8192


def tile_rows(v: np.ndarray, R: int) -> np.ndarray:
    """v (D,) repeated as R rows: (R, D) C-contiguous (one assignment: ~3x faster than np.tile at these sizes)."""
    t = np.empty((R, v.shape[-1]), v.dtype)
    t[...] = v
    return t


def row_op(ufunc, a: np.ndarray, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ufunc(a, v) broadcasting v (D,) over the rows of a (..., D), by long inner loops (see ROW_TILE_ELEMS).
    out: optional destination shaped like a (may be a itself). Same values as ufunc(a, v, out=out)."""
    out = np.empty(np.broadcast_shapes(a.shape, v.shape), np.result_type(a, v)) if out is None else out
    D = a.shape[-1] if a.ndim else 1
    R = ROW_TILE_ELEMS // max(D, 1)
    if a.ndim < 2 or v.shape != (D,) or out.shape != a.shape or R < 2 or not (
            a.flags.c_contiguous and out.flags.c_contiguous):
        return ufunc(a, v, out=out)
    a2, o2 = a.reshape(-1, D), out.reshape(-1, D)
    N = a2.shape[0]
    R = min(R, N)
    M = N - N % R  # rows done R at a time; the rest row by row
    if M:
        ufunc(a2[:M].reshape(-1, R * D), tile_rows(v, R).reshape(-1), out=o2[:M].reshape(-1, R * D))
    if M < N:
        ufunc(a2[M:], v, out=o2[M:])
    return out


def add_row_(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """a += v in place for a (..., D), v (D,) (a bias): row_op(np.add, a, v, out=a)."""
    return row_op(np.add, a, v, out=a)


def _float_array(x) -> np.ndarray:
    """x as an ndarray of a float dtype (ints -> float64); a no-op for float arrays. Lets the in-place kernels below
    take Python scalars and 0-d arrays too (ufuncs turn 0-d results into scalars, which `out=` cannot take)."""
    x = np.asarray(x)
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _square(x: np.ndarray) -> np.ndarray:
    """x * x into a fresh array (an ndarray even for 0-d x)."""
    return np.multiply(x, x, out=np.empty_like(x))


def _is_last(x: np.ndarray, axis: int) -> bool:
    return axis == -1 or axis == x.ndim - 1


# -- softmax ---------------------------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x: (..., K) -> p: (..., K), rows sum to 1. Subtracts the row max for stability."""
    z = x - x.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    s = row_sum(z) if _is_last(z, axis) else z.sum(axis=axis, keepdims=True)
    z *= np.reciprocal(s, out=s)  # one divide per row, then a multiply per element
    return z


def softmax_backward(p: np.ndarray, dp: np.ndarray, axis: int = -1) -> np.ndarray:
    """dx = p * (dp - sum(dp * p)) along `axis`."""
    dx = dp * p
    s = row_sum(dx) if _is_last(dx, axis) else dx.sum(axis=axis, keepdims=True)
    dx -= p * s
    return dx


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x: (..., K) -> log p: (..., K)."""
    z = x - x.max(axis=axis, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z


# -- normalization ---------------------------------------------------------------------------------------------------
def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, eps: float = 1e-5):
    """x: (..., D) -> y: (..., D), plus (xhat, rstd) for the backward; rstd: (..., 1).
    Biased variance, as in Ba et al. / PyTorch. Two full-size allocations (xhat, y)."""
    xhat = x - row_mean(x)  # (..., D) centred; normalized in place below
    var = np.vecdot(xhat, xhat)[..., None]  # (..., 1) sum of squares, without a squared copy
    var *= 1.0 / x.shape[-1]
    var += eps
    rstd = np.sqrt(var, out=var)
    np.divide(1.0, rstd, out=rstd)
    xhat *= rstd
    y = row_op(np.multiply, xhat, gamma, out=np.empty_like(xhat))
    if beta is not None:
        add_row_(y, beta)
    return y, (xhat, rstd)


def layer_norm_backward(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray):
    """Closed form: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.

    Returns dx (..., D), dgamma (D,), dbeta (D,). Both row means are gemvs with gamma / D: mean(g * xhat) is
    (dy * xhat) . gamma / D, reusing the product dgamma sums, and mean(g) is dy . gamma / D. Five elementwise
    passes over (..., D), two full-size allocations.
    """
    D = dy.shape[-1]
    t = dy * xhat
    dgamma = col_sum(t)
    dbeta = col_sum(dy)
    gamma_over_d = np.divide(gamma, D, dtype=t.dtype)
    m_gx = _row_dot(t, gamma_over_d)  # (..., 1) mean(g * xhat)
    m_g = _row_dot(dy, gamma_over_d)  # (..., 1) mean(g)
    g = row_op(np.multiply, dy, gamma.astype(t.dtype, copy=False))  # becomes dx
    np.multiply(xhat, m_gx, out=t)
    g -= t
    g -= m_g
    g *= rstd
    return g, dgamma, dbeta


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6):
    """Zhang & Sennrich (2019): y = x / sqrt(mean(x^2) + eps) * gamma. Returns y and (xhat, rstd); rstd: (..., 1)."""
    xhat = np.square(x)
    ms = row_mean(xhat)
    ms += eps
    rstd = np.sqrt(ms, out=ms)
    np.reciprocal(rstd, out=rstd)
    np.multiply(x, rstd, out=xhat)
    return xhat * gamma, (xhat, rstd)


def rms_norm_backward(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray):
    """dx = rstd * (g - xhat * mean(g * xhat)), g = dy * gamma; mean(g * xhat) = (dy * xhat) . gamma / D as in
    layer_norm_backward. Returns dx, dgamma."""
    D = dy.shape[-1]
    t = dy * xhat
    dgamma = col_sum(t)
    m_gx = _row_dot(t, np.divide(gamma, D, dtype=t.dtype))  # (..., 1)
    g = row_op(np.multiply, dy, gamma.astype(t.dtype, copy=False))  # becomes dx
    np.multiply(xhat, m_gx, out=t)
    g -= t
    g *= rstd
    return g, dgamma


# -- activations -----------------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray):
    """GELU, tanh approximation (Hendrycks & Gimpel): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

    Returns y and s = sigmoid(2u) = 0.5 (1 + tanh u) for the backward. Computed as y = x * s with
    s = 1 / (1 + exp(-2u)): NumPy's float32 exp costs ~1.8 ns/element here against ~2.8 ns for tanh, and a
    reciprocal then a multiply beat two divides. exp overflowing to inf for very negative x is exact here (s -> 0,
    y -> -0), so that warning is silenced. Used by the GELU layer and the Transformer FFN at inference; training
    uses gelu_tanh_with_derivative.
    """
    x = _float_array(x)
    s = _square(x)
    s *= -2.0 * 0.044715 * _SQRT_2_OVER_PI
    s -= 2.0 * _SQRT_2_OVER_PI
    s *= x  # -2u
    with np.errstate(over="ignore"):
        np.exp(s, out=s)
    s += 1.0  # 1 + exp(-2u)
    np.reciprocal(s, out=s)
    return np.multiply(x, s), s


def gelu_tanh_inplace(x: np.ndarray) -> np.ndarray:
    """Inference GELU (tanh approximation) overwriting x (C-contiguous float (..., F)), chunk by chunk in cache with
    one (R, F) scratch: y = x * sigmoid(2u), the same arithmetic as gelu_tanh, no derivative. Returns x."""
    F = x.shape[-1] if x.ndim else 1
    x2 = x.reshape(-1, F)
    N = x2.shape[0]
    R = max(1, min(N, GELU_CHUNK_ELEMS // max(F, 1)))
    t_buf = np.empty((R, F), dtype=x.dtype)
    k = _SQRT_2_OVER_PI
    with np.errstate(over="ignore"):
        for r0 in range(0, N, R):
            xb, t = x2[r0:r0 + R], t_buf[:min(R, N - r0)]
            np.multiply(xb, xb, out=t)
            t *= -2.0 * 0.044715 * k
            t -= 2.0 * k
            t *= xb  # -2u
            np.exp(t, out=t)
            t += 1.0
            np.divide(xb, t, out=xb)  # x / (1 + exp(-2u)) = x sigmoid(2u)
    return x


def gelu_tanh_backward(dy: np.ndarray, x: np.ndarray, s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """dy/dx = s + x * 2 u' s (1 - s),  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2), s = sigmoid(2u) from gelu_tanh.

    `out` (e.g. dy itself, when the caller no longer needs it) takes the result without a new allocation."""
    x, s = _float_array(x), _float_array(s)
    g = _square(x)
    g *= 3.0 * 0.044715 * 2.0 * _SQRT_2_OVER_PI
    g += 2.0 * _SQRT_2_OVER_PI  # 2u'
    g *= x
    w = np.subtract(1.0, s, out=np.empty_like(s))
    w *= s  # s (1 - s)
    g *= w
    g += s
    return np.multiply(g, dy, out=g if out is None else out)


# Rows per chunk so that one chunk of each array the fused kernel touches (x, y, two scratch) stays in the 512 KB
# L2 cache: 32K elements = 128 KB per float32 array.
GELU_CHUNK_ELEMS = 32768


def gelu_tanh_with_derivative(x: np.ndarray, y: np.ndarray | None = None, dydx: np.ndarray | None = None,
                              bias: np.ndarray | None = None):
    """Training-time GELU (tanh approximation): y = gelu(x + bias) and its derivative dy/dx, both computed chunk by
    chunk while each chunk is in cache, so the backward is one multiply (dx = dy * dydx) and keeps nothing else.

    x: (..., F) float array (a non-contiguous one is copied first); y, dydx: optional C-contiguous (..., F)
    destinations. dydx may be x itself (the FFN passes its pre-activation buffer, dead after this). bias: optional
    (F,) added to x first, in place (as `x += bias` would). Same math as gelu_tanh / gelu_tanh_backward:
    s = sigmoid(2u), dydx = s + x 2u' s (1 - s) = s + y (1 - s) 2u'. Returns (y, dydx).
    """
    x = _float_array(x)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # the row blocks below are views of x: they must not be copies
    F = x.shape[-1] if x.ndim else 1
    x2 = x.reshape(-1, F)
    y = np.empty(x.shape, dtype=x.dtype) if y is None else y
    dydx = np.empty(x.shape, dtype=x.dtype) if dydx is None else dydx
    if not (y.flags.c_contiguous and dydx.flags.c_contiguous) or y.shape != x.shape or dydx.shape != x.shape:
        raise ValueError(f"gelu_tanh_with_derivative: y and dydx must be C-contiguous of shape {x.shape}")
    y2, d2 = y.reshape(-1, F), dydx.reshape(-1, F)
    N = x2.shape[0]
    R = max(1, min(N, GELU_CHUNK_ELEMS // max(F, 1)))
    q_buf = np.empty((R, F), dtype=x.dtype)
    t_buf = np.empty((R, F), dtype=x.dtype)
    bias_rows = None if bias is None else tile_rows(np.asarray(bias, x.dtype), R)  # (R, F): same-shape adds
    k = _SQRT_2_OVER_PI
    with np.errstate(over="ignore"):
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            xb, yb, db = x2[r0:r1], y2[r0:r1], d2[r0:r1]
            q, t = q_buf[:r1 - r0], t_buf[:r1 - r0]
            if bias_rows is not None:
                np.add(xb, bias_rows[:r1 - r0], out=xb)
            np.multiply(xb, xb, out=q)  # x^2
            np.multiply(q, -2.0 * 0.044715 * k, out=t)
            t -= 2.0 * k
            t *= xb  # -2u
            np.exp(t, out=t)
            t += 1.0
            np.divide(1.0, t, out=t)  # s = sigmoid(2u) (a divide runs faster than np.reciprocal here)
            np.multiply(xb, t, out=yb)  # y = x s; x is dead from here on (db may be xb)
            q *= 3.0 * 0.044715 * 2.0 * k
            q += 2.0 * k  # 2u'
            np.subtract(1.0, t, out=db)
            db *= yb
            db *= q
            db += t  # s + y (1 - s) 2u'
    return y, dydx


def gelu_erf(x: np.ndarray):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). Returns y and Phi(x)."""
    from scipy.special import erf  # NumPy has no erf
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    return x * cdf, cdf


def gelu_erf_backward(dy: np.ndarray, x: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """d/dx = Phi(x) + x phi(x)."""
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), with no overflow warning for large |x|: exp(-x) = inf for x << 0 gives exactly 0.
    Unlike 0.5 (1 + tanh(x / 2)) it keeps full relative precision for very negative x (no 1 - 1 cancellation),
    and NumPy's exp is faster than its tanh."""
    x = _float_array(x)
    e = np.negative(x, out=np.empty_like(x))
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1.0
    return np.reciprocal(e, out=e)


def sigmoid_backward(dy: np.ndarray, s: np.ndarray) -> np.ndarray:
    """dx = dy * s (1 - s), s = sigmoid(x)."""
    dx = 1.0 - s
    dx *= s
    dx *= dy
    return dx


def tanh_backward(dy: np.ndarray, t: np.ndarray) -> np.ndarray:
    """dx = dy (1 - t^2), t = tanh(x)."""
    dx = _square(_float_array(t))
    np.subtract(1.0, dx, out=dx)
    dx *= dy
    return dx


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0), same dtype as x."""
    return np.maximum(x, 0)


def relu_backward(dy: np.ndarray, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """dx = dy * 1[y > 0] (the kink at 0 takes the 0 side, as in PyTorch); y may be the input or the output.

    A multiply by the mask: 4-7x faster than np.where(y > 0, dy, 0) at (128, 256) .. (2048, 512) float32. (Unlike
    where, a non-finite dy at a dead unit stays non-finite; the step is already non-finite then.) `out` may be dy."""
    return np.multiply(dy, y > 0, out=out)


def silu(x: np.ndarray):
    """SiLU / Swish-1 (Elfwing et al. 2017; Ramachandran et al. 2017): x sigmoid(x). Returns y and s = sigmoid(x)."""
    s = sigmoid(x)
    return x * s, s


def silu_backward(dy: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """d/dx = s (1 + x (1 - s))."""
    dx = 1.0 - s
    dx *= x
    dx += 1.0
    dx *= s
    dx *= dy
    return dx


# -- dropout ---------------------------------------------------------------------------------------------------------
def dropout_mask(rng: np.random.Generator, shape, p: float, dtype) -> np.ndarray:
    """Inverted dropout (Srivastava et al. 2014): (shape) array of 0 (probability p) or 1 / (1 - p), in `dtype`
    (float32 / float64; other dtypes get float64), so eval needs no rescale. Draws rng.random(shape) in that dtype:
    U[0, 1) < p drops with probability exactly p. One allocation (the draw is overwritten by the mask)."""
    dtype = np.dtype(dtype) if np.dtype(dtype) in (np.float32, np.float64) else np.dtype(np.float64)
    u = rng.random(shape, dtype=dtype)
    return np.multiply(u >= p, 1.0 / (1.0 - p), out=u, dtype=dtype)


# -- embedding -------------------------------------------------------------------------------------------------------
def embedding_backward(dW: np.ndarray, ids: np.ndarray, dy: np.ndarray, padding_idx: int | None = None,
                       scale: float = 1.0) -> None:
    """Scatter-add: dW[ids[i]] += scale * dy[i] for every i, repeated ids summed. dW: (V, D) (a strided view is
    fine); ids: (...) int; dy: (..., D). Positions holding `padding_idx` add nothing (dropped after the sort: no
    (N, D) copy of dy). `scale` rides in the sparse matrix's values: no (N, D) product either.

    Sort the ids once, then a sparse (U x N) 0/1 matrix (U distinct ids) times dy sums the repeated rows in one
    pass of compiled code. Measured at 1 thread, float32 (V, D, N): (65, 128, 8192) 1.0 ms vs np.add.at 20 ms and
    sort + np.add.reduceat 4 ms; (50257, 768, 8192) 19 ms vs 69 ms and 90 ms; at Multi30k's shapes, (8000, 256, 2500)
    uniform ids, 0.7 ms vs 4.8 ms and 3.1 ms (np.bincount per column: 17 ms; a one-hot GEMM over the distinct ids:
    26 ms). Falls back to reduceat without scipy.
    """
    V, D = dW.shape
    ids = ids.reshape(-1)
    dy = dy.reshape(-1, D)
    N = ids.shape[0]
    if N == 0:
        return
    try:
        import scipy.sparse as sp
    except ImportError:  # scipy comes with scikit-learn; keep a pure-NumPy path anyway
        sp = None
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.empty(N, dtype=bool)
    starts[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=starts[1:])
    starts = np.flatnonzero(starts)  # (U,) first position of each distinct id in sorted order
    rows = sorted_ids[starts]  # (U,) distinct ids, ascending
    if sp is None:
        sums = np.add.reduceat(dy[order], starts, axis=0)  # (U, D)
        if scale != 1.0:
            sums *= np.asarray(scale, sums.dtype)
    else:
        indptr = np.append(starts, N)
        M = sp.csr_matrix((np.full(N, scale, dtype=dy.dtype), order, indptr), shape=(rows.shape[0], N))
        sums = M @ dy  # (U, D)
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, sums = rows[keep], sums[keep]
    dW[rows] += sums  # rows are distinct, so fancy-index += is exact
