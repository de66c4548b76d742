"""What a fused, compiled elementwise kernel would buy over NumPy: GELU-tanh with its derivative, the largest
elementwise cost of a transformer step (issue 5's speed targets).

The engine computes y = gelu(x + b1) and dy/dx in ~15 NumPy passes (`kernels.gelu_tanh_with_derivative`). This
probe times it against ONE loop compiled by numba, both on the blocks the FFN uses (FFN_BLOCK_ELEMS elements), and
checks both against a float64 reference. The compiled loop uses a rational tanh (Eigen's float `ptanh`
coefficients: only multiplies, adds and a divide, so LLVM vectorizes it); numba's `math.exp` or `math.tanh`
call libm once per element and are no faster than NumPy (measured: 5.7 and 20 ns per element). The rational tanh
is less exact in the far negative tail, where 1 + tanh(u) cancels: its error there is ~2e-5 against NumPy's ~1e-6
(a kernel for the engine would take sigmoid(2u) from a vectorized exp instead: ~2 ns per element in a trial).

numba is not a dependency of ndtrain (the engine is pure NumPy); this probe informs that decision:

    .venv/bin/pip install numba && .venv/bin/python bench/fused_gelu_probe.py [--d-ff 512] [--reps 50]

Prints ns per element for each, their ratio, the max error against float64 (|err| / (1 + |ref|)), and what each
costs per training step of the bench configs S and M (their FFN hidden elements: layers x batch x length x d_ff).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ndtrain.engine import kernels
from ndtrain.engine.transformer.ffn import FFN_BLOCK_ELEMS

STEP_ELEMS = {"S": 4 * 64 * 32 * 512, "M": 4 * 32 * 128 * 1024}  # FFN hidden elements per bench step

f32 = np.float32
SQRT_2_OVER_PI, GELU_C = f32(math.sqrt(2.0 / math.pi)), f32(0.044715)
# tanh(u) ~ u P(u^2) / Q(u^2) on |u| <= CLAMP (Eigen, generic_fast_tanh_float)
CLAMP = f32(7.90531110763549805)
ALPHA = [f32(a) for a in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
                          -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)]
BETA = [f32(b) for b in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)]


def make_fused():
    import numba

    k, c = SQRT_2_OVER_PI, GELU_C
    a1, a3, a5, a7, a9, a11, a13 = ALPHA
    b0, b2, b4, b6 = BETA
    one, half, two, three, clamp = f32(1), f32(0.5), f32(2), f32(3), CLAMP

    # error_model="numpy": no ZeroDivisionError branch, which would stop LLVM from vectorizing the loop
    @numba.njit(fastmath=True, boundscheck=False, error_model="numpy")
    def gelu_fused(x, bias, y, dydx):  # x, y, dydx: (R, F); bias: (F,)
        R, F = x.shape
        for i in range(R):
            xr, yr, dr = x[i], y[i], dydx[i]
            for j in range(F):
                v = xr[j] + bias[j]
                u = k * v * (one + c * v * v)
                u = clamp if u > clamp else u
                u = -clamp if u < -clamp else u
                u2 = u * u
                p = ((((((a13 * u2 + a11) * u2 + a9) * u2 + a7) * u2 + a5) * u2 + a3) * u2 + a1) * u
                q = ((b6 * u2 + b4) * u2 + b2) * u2 + b0
                s = half + half * (p / q)  # 0.5 (1 + tanh u)
                yy = v * s
                yr[j] = yy
                dr[j] = s + yy * (one - s) * (two * k * (one + three * c * v * v))

    return gelu_fused


def reference(x: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = x.astype(np.float64) + bias
    u = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
    s = 0.5 * (1.0 + np.tanh(u))
    return v * s, s + v * s * (1.0 - s) * 2.0 * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * v * v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    try:
        fused = make_fused()
    except ImportError:
        print("numba is not installed: .venv/bin/pip install numba", file=sys.stderr)
        return 2
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    F = args.d_ff
    R = max(1, FFN_BLOCK_ELEMS // F)
    x = (rng.standard_normal((R, F)) * 2).astype(np.float32)  # pre-activations as the FFN sees them, and tails
    bias = (rng.standard_normal(F) * 0.1).astype(np.float32)
    h, y_np, y_nb, d_nb = (np.empty_like(x) for _ in range(4))

    def run_numpy():
        h[...] = x  # the kernel overwrites its input with the derivative; refill (timed separately below)
        kernels.gelu_tanh_with_derivative(h, y=y_np, dydx=h, bias=bias)

    runs = {"numpy": run_numpy, "fused": lambda: fused(x, bias, y_nb, d_nb), "refill": lambda: h.__setitem__(..., x)}
    for f in runs.values():
        f()  # compile, warm the caches
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ns = {name: np.median(t) / x.size * 1e9 for name, t in times.items()}
    ns["numpy"] -= ns.pop("refill")
    run_numpy()  # the last timed pass was a refill: h holds x again
    y_ref, d_ref = reference(x, bias)

    def err(y, d):  # max |error| / (1 + |reference|) over y and dy/dx
        return max((np.abs(y - y_ref) / (1 + np.abs(y_ref))).max(), (np.abs(d - d_ref) / (1 + np.abs(d_ref))).max())

    err_np, err_nb = err(y_np, h), err(y_nb, d_nb)
    print(f"GELU-tanh + derivative on ({R}, {F}) float32 blocks, 1 thread, median of {args.reps}:")
    print(f"  NumPy kernel (engine):  {ns['numpy']:.2f} ns/elem   error vs float64 {err_np:.1e}")
    print(f"  fused numba loop:       {ns['fused']:.2f} ns/elem   error vs float64 {err_nb:.1e}")
    print(f"  fused / NumPy:          {ns['fused'] / ns['numpy']:.3f}")
    for cfg, n in STEP_ELEMS.items():
        print(f"  per {cfg} step ({n / 1e6:.1f} M elements): NumPy {ns['numpy'] * n / 1e6:.1f} ms, "
              f"fused {ns['fused'] * n / 1e6:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
