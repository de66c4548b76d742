"""ndtrain engine vs PyTorch eager: ms per training step (forward + backward + AdamW), same run, same threads.

Configs (issue 5, ANCHORS.md section 2), both engines building the same network: pre-LN, GELU (tanh approximation),
learned positional embeddings, causal decoder self-attention, cross-entropy over the vocabulary, AdamW.
  S    encoder-decoder d_model 128, 4 heads, d_ff 512, 2+2 layers, vocab 64, batch 64, source/target length 32
  M    decoder-only LM d_model 256, 8 heads, d_ff 1024, 4 layers, vocab 256 (tied embeddings), batch 32, length 128
  MLP  784-256-128-10 ReLU, batch 128 (issue 3)
The two engines' timed steps are interleaved (alternating which goes first) to cancel the machine's drift; min and
median are reported, and `ratio_paired`, the median over steps of each ndtrain step's time over the torch step
timed next to it (the most drift-proof of the three). --floor adds the step's GEMMs replayed alone (gemm_floor.py).
GFLOP/s counts FLOPs as ANCHORS.md does; the peak is the best NumPy float32 GEMM measured in this run at the same
thread count (probed before and between the timed steps). Memory, by tracemalloc over one
separate ndtrain step (NumPy reports its allocations to it): `activations_mb` = arrays alive after the forward (the
logits plus what the backward closures keep: per block the norm outputs and 1/std, the fused QKV projection, the
scaled queries, the attention weights, the attention output, the FFN pre-activation, its sigmoid and its output);
`peak_mem_mb` = the high-water mark over forward + loss + backward + AdamW, above the resident parameters,
gradients and AdamW moments. By default glibc is told to keep freed memory (engine.memory.retain_freed_memory), so
the steps do not page-fault through their activations each time; --no-retain-memory measures the default.
"""
from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import time
import tracemalloc

import numpy as np

from ndtrain.engine import ParamStore
from ndtrain.engine.layers import Linear, ReLU
from ndtrain.engine.losses import cross_entropy_fused
from ndtrain.engine.memory import retain_freed_memory
from ndtrain.engine.optim import AdamW
from ndtrain.engine.transformer import DecoderLM, DecoderLMConfig, Seq2SeqConfig, Seq2SeqTransformer
from ndtrain.engine import Sequential
from .gemm_floor import make_replay
from .torch_reference import build_torch
from ndtrain.launch.errors import UsageError
from threadpoolctl import threadpool_limits

CONFIGS = {
    "S": dict(kind="seq2seq", d=128, h=4, ff=512, layers=(2, 2), vocab=64, batch=64, len=32),
    "M": dict(kind="lm", d=256, h=8, ff=1024, layers=(0, 4), vocab=256, batch=32, len=128),
    "MLP": dict(kind="mlp", sizes=(784, 256, 128, 10), batch=128),
}
LR, WD = 3e-4, 0.01


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    p.add_argument("--configs", default="S,M,MLP", help="comma-separated subset of S,M,MLP")
    p.add_argument("--steps", type=int, default=0, help="timed steps per engine (default: S 20, M 8, MLP 200)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="time ndtrain only")
    p.add_argument("--json", action="store_true", help="one JSON object per config on stdout")
    p.add_argument("--profile", action="store_true", help="cProfile a few ndtrain steps (top functions)")
    p.add_argument("--floor", action="store_true",
                   help="also time the step's GEMMs alone (launch/bench/gemm_floor.py), interleaved with the engines")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="leave glibc's defaults (by default freed memory is kept for reuse: no page faults per step;"
                        " process-wide, so both engines get it)")


# -- FLOPs (ANCHORS.md section 2 convention) --------------------------------------------------------------------------
def gflop_per_step(c: dict) -> float:
    if c["kind"] == "mlp":
        s = c["sizes"]
        return 6 * c["batch"] * sum(a * b for a, b in zip(s, s[1:])) / 1e9
    d, ff, V, B, T = c["d"], c["ff"], c["vocab"], c["batch"], c["len"]
    n_enc, n_dec = c["layers"]
    N = B * T
    if c["kind"] == "seq2seq":
        mm = 6 * N * n_enc * (4 * d * d + 2 * d * ff) + 6 * N * (n_dec * (8 * d * d + 2 * d * ff) + d * V)
        attn = B * 12 * d * (n_enc * T * T + n_dec * 2 * T * T)
    else:
        mm = 6 * N * (n_dec * (4 * d * d + 2 * d * ff) + d * V)
        attn = B * 12 * d * n_dec * T * T
    return (mm + attn) / 1e9


def gemm_peak(n_rounds: int = 5, sizes=(512, 1024)) -> float:
    best = 0.0
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        out = np.empty_like(a)
        reps = max(1, int(0.02 / (2 * n ** 3 / 80e9)))
        np.matmul(a, a, out=out)
        for _ in range(n_rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                np.matmul(a, a, out=out)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


# -- the ndtrain side -------------------------------------------------------------------------------------------------
def _data(c: dict, rng):
    if c["kind"] == "mlp":
        return {"x": rng.standard_normal((c["batch"], c["sizes"][0])).astype(np.float32),
                "y": rng.integers(0, c["sizes"][-1], c["batch"])}
    shape = (c["batch"], c["len"])
    ids = lambda: rng.integers(4, c["vocab"], shape)  # noqa: E731  no PAD: every token counts
    return {"src": ids(), "tgt_in": ids(), "tgt_out": ids()} if c["kind"] == "seq2seq" else {"x": ids(), "y": ids()}


def build_ndtrain(c: dict):
    """Returns (store, step_fn) where step_fn(batch) -> (fwd_s, bwd_s, opt_s) runs one training step."""
    if c["kind"] == "mlp":
        s = c["sizes"]
        layers = []
        for i, (a, b) in enumerate(zip(s, s[1:])):
            # the first layer's input is data: like autograd, no input gradient is computed for it
            layers += [Linear(a, b, input_grad=i > 0)] + ([ReLU()] if i < len(s) - 2 else [])
        model = Sequential(*layers)
    elif c["kind"] == "seq2seq":
        n_enc, n_dec = c["layers"]
        model = Seq2SeqTransformer(Seq2SeqConfig(
            d_model=c["d"], n_heads=c["h"], d_ff=c["ff"], dropout=0.0, activation="gelu", norm_placement="pre",
            positional="learned", max_len=c["len"], src_vocab=c["vocab"], tgt_vocab=c["vocab"],
            n_enc_layers=n_enc, n_dec_layers=n_dec, tie_output=False))
    else:
        model = DecoderLM(DecoderLMConfig(
            d_model=c["d"], n_heads=c["h"], d_ff=c["ff"], dropout=0.0, activation="gelu", norm_placement="pre",
            positional="learned", max_len=c["len"], vocab_size=c["vocab"], n_layers=c["layers"][1],
            tie_embeddings=True))
    store = ParamStore.from_module(model, seed=0)
    opt = AdamW(store, lr=LR, weight_decay=WD, decay_mask=False)  # torch's single param group decays everything

    def step(b):
        t0 = time.perf_counter()
        store.zero_grad()
        if c["kind"] == "mlp":
            logits, backward = model(b["x"], train=True)
            target = b["y"]
        elif c["kind"] == "seq2seq":
            logits, backward = model(b["src"], b["tgt_in"], train=True)
            target = b["tgt_out"]
        else:
            logits, backward = model(b["x"], train=True)
            target = b["y"]
        _, count, grad_fn = cross_entropy_fused(logits, target, ignore_index=0, inplace=True)
        t1 = time.perf_counter()
        backward(grad_fn(1.0 / count))
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return store, model, step


def memory_profile(c: dict, step, batch) -> dict:
    """MB above the resident parameters / grads / optimizer state during one step (see the module docstring)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    step(batch)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"peak_mb": peak / 2 ** 20}


def activation_mb(c: dict, model, batch) -> float:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    if c["kind"] == "seq2seq":
        out = model(batch["src"], batch["tgt_in"], train=True)
    else:
        out = model(batch["x"], train=True)
    kept = tracemalloc.get_traced_memory()[0] - base  # logits + everything the backward closures hold
    tracemalloc.stop()
    del out
    return kept / 2 ** 20


def _summary(times):
    tot = [sum(t) for t in times]
    return {"min": min(tot) * 1e3, "median": statistics.median(tot) * 1e3,
            "fwd": statistics.median(t[0] for t in times) * 1e3, "bwd": statistics.median(t[1] for t in times) * 1e3,
            "opt": statistics.median(t[2] for t in times) * 1e3}


def run_config(name: str, args, peak: float, torch_ok: bool) -> dict:
    c = CONFIGS[name]
    steps = args.steps or {"S": 20, "M": 8, "MLP": 200}[name]
    batch = _data(c, np.random.default_rng(1))
    store, model, nd_step = build_ndtrain(c)
    engines = {"ndtrain": nd_step}
    if torch_ok:
        t_step, to_torch = build_torch(c, LR, WD)
        tbatch = to_torch(batch)
        engines["torch"] = lambda _b: t_step(tbatch)
    if getattr(args, "floor", False) and c["kind"] != "mlp":
        engines["gemm_floor"] = make_replay(c)
    for _ in range(args.warmup):
        for f in engines.values():
            f(batch)
    times = {k: [] for k in engines}
    order = list(engines)
    for i in range(steps):
        for k in (order if i % 2 == 0 else order[::-1]):
            times[k].append(engines[k](batch))
        peak = max(peak, gemm_peak(n_rounds=1, sizes=(512,)))  # the machine's speed drifts: probe it throughout
    nd = _summary(times["ndtrain"])
    gf = gflop_per_step(c)
    row = {"config": name, "threads": args.threads, "retain_memory": not args.no_retain_memory, "steps": steps, "gflop_per_step": round(gf, 3),
           "ms_ndtrain": round(nd["median"], 2), "ms_ndtrain_min": round(nd["min"], 2),
           "ndtrain_fwd_bwd_opt_ms": [round(nd[k], 2) for k in ("fwd", "bwd", "opt")],
           "gflops": round(gf / nd["min"] * 1e3, 1), "gflops_median": round(gf / nd["median"] * 1e3, 1),
           "peak_gflops": round(peak, 1), "params": store.size}
    row["pct_of_peak"] = round(100 * row["gflops"] / peak, 1)
    if torch_ok:
        tt = _summary(times["torch"])
        row.update({"ms_torch": round(tt["median"], 2), "ms_torch_min": round(tt["min"], 2),
                    "torch_fwd_bwd_opt_ms": [round(tt[k], 2) for k in ("fwd", "bwd", "opt")],
                    "ratio": round(nd["median"] / tt["median"], 3), "ratio_min": round(nd["min"] / tt["min"], 3),
                    # each ndtrain step over the torch step timed next to it: immune to the machine's slow drift
                    "ratio_paired": round(statistics.median(sum(a) / sum(b) for a, b in
                                                            zip(times["ndtrain"], times["torch"])), 3)})
    else:
        row.update({"ms_torch": None, "ratio": None})
    if "gemm_floor" in times:  # the step's GEMMs alone: what no NumPy engine on this BLAS can go below
        fl = _summary(times["gemm_floor"])
        row["ms_gemm_floor"] = round(fl["median"], 2)
        row["gemm_floor_share"] = round(fl["median"] / nd["median"], 3)  # of the ndtrain step
        if torch_ok:
            row["floor_ratio"] = round(fl["median"] / tt["median"], 3)  # floor / torch step
    if c["kind"] != "mlp":
        row["activations_mb"] = round(activation_mb(c, model, batch), 1)
    row["peak_mem_mb"] = round(memory_profile(c, nd_step, batch)["peak_mb"], 1)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(max(2, steps // 4)):
            nd_step(batch)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        row["profile"] = buf.getvalue()
    return row


def main(args) -> int:

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise UsageError(f"--configs: unknown {bad}; choose from {list(CONFIGS)}")
    if not args.no_retain_memory:
        retain_freed_memory()
    torch_ok = False
    if not args.no_torch:
        try:
            import torch  # torch: optional, the reference of the benchmark only
            torch.set_num_threads(args.threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
            torch_ok = True
        except ImportError:
            print("# torch is not installed: timing ndtrain only (pip install torch==2.13.0)")
    with threadpool_limits(args.threads, user_api="blas"):
        peak = gemm_peak()
        for name in names:
            row = run_config(name, args, peak, torch_ok)
            profile = row.pop("profile", None)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                _print_row(row)
            if profile:
                print(profile)
    return 0


def _print_row(r: dict) -> None:
    t = (f"torch {r['ms_torch']:.1f} ms (min {r['ms_torch_min']:.1f}, fwd/bwd/opt {r['torch_fwd_bwd_opt_ms']}), "
         f"ratio {r['ratio']:.3f} (min/min {r['ratio_min']:.3f}, paired {r['ratio_paired']:.3f})" if r["ms_torch"] is not None else "torch n/a")
    mem = f", activations {r['activations_mb']} MB" if "activations_mb" in r else ""
    if "ms_gemm_floor" in r:
        mem += (f" | GEMMs alone {r['ms_gemm_floor']:.1f} ms = {r['gemm_floor_share']:.2f} of the ndtrain step"
                + (f", {r['floor_ratio']:.3f}x torch's" if "floor_ratio" in r else ""))
    print(f"{r['config']:>3} @{r['threads']} thr: ndtrain {r['ms_ndtrain']:.1f} ms median (min {r['ms_ndtrain_min']:.1f},"
          f" fwd/bwd/opt {r['ndtrain_fwd_bwd_opt_ms']}) | {t} | {r['gflops']} GFLOP/s = {r['pct_of_peak']}% of "
          f"{r['peak_gflops']} peak | peak step memory {r['peak_mem_mb']} MB{mem}", flush=True)
