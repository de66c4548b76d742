"""`ndtrain bench scaling`: data-parallel scaling of the S transformer (issue 5's config, launch/bench/engine.py):
2 workers x 1 thread with communication on, against the same 2 workers with communication switched off (on one
machine that is the ceiling: the two processes share memory bandwidth), under MPI and under Ray; and against
1 worker x 1 thread and 1 worker x 2 threads. Plus the overlap figure: the share of the step spent waiting on
communication, with bucketing (buckets launched during backward, cluster.reducer.GradReducer) and without (one
all-reduce of the whole gradient after backward).

    ndtrain bench scaling [--steps 4] [--rounds 3] [--bucket-mb 4] [--no-mpi] [--no-ray] [--json]

Inside each 2-worker job the modes are INTERLEAVED (rounds x [comm, nocomm, nobucket] x steps), so their ratios
come from the same minutes of this noisy machine. Per mode: the median step time, max over ranks. Throughput is
samples/s with a fixed per-worker batch (S: 64 rows x 32 tokens): 2 workers process 2 x 64 rows per step.
  comm      the real step: GradReducer (overlap on, --bucket-mb buckets) + the [loss, count] all-reduce + AdamW
  nocomm    the same step without any communication (the ceiling)
  nobucket  communication without overlap: one all-reduce of the whole gradient after backward
comm_share = (time blocked in communication + time inside launches) / step time. For MPI the launches
(Iallreduce) return at once; the Ray transport (shared memory on one node) reduces inside the launch, so its
"launch" time is communication too. The 1-worker figures run in this process, between the jobs.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np
from ndtrain.launch import rundir
from ndtrain.cluster.reducer import GradReducer
from ndtrain.launch.launch_mpi import run_mpi
from ndtrain.launch.launch_ray import run_ray
from ndtrain.engine.optim import AdamW
from ndtrain.launch.bench.engine import CONFIGS, _data, build_ndtrain
from ndtrain.engine.losses import cross_entropy_fused
from threadpoolctl import threadpool_limits

MODES = ("comm", "nocomm", "nobucket")


def add_arguments(p) -> None:
    p.add_argument("--config", default="S", choices=("S", "M", "MLP"), help="engine bench config (default S)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all modes")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the rounds")
    # 1 MB, not cluster.bucket_mb's 4 MB: S has 3.66 MB of gradients, so 4 MB buckets make ONE bucket, launched
    # only when backward is over (no overlap at all)
    p.add_argument("--bucket-mb", type=float, default=1.0, help="GradReducer bucket size for the comm mode")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-mpi", action="store_true")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-single", action="store_true", help="skip the 1-worker x 1/2-thread runs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


# -- one rank's model and step -----------------------------------------------------------------------------------------
class Stepper:
    """The S model, its flat buffers, AdamW, and a batch; step(reducer, comm) runs one training step and returns
    (step_s, comm_s) where comm_s is the time spent in communication calls (launches + waits)."""

    def __init__(self, config: str, seed: int):
        self.c = CONFIGS[config]
        self.store, self.model, _ = build_ndtrain(self.c)
        self.opt = AdamW(self.store, lr=3e-4, weight_decay=0.01, decay_mask=False)
        self.batch = _data(self.c, np.random.default_rng(seed))
        self.rows = len(next(iter(self.batch.values())))
        self._buf = np.zeros(2, np.float64)

    def _loss(self):
        b, kind = self.batch, self.c["kind"]
        if kind == "seq2seq":
            logits, backward = self.model(b["src"], b["tgt_in"], train=True)
            target = b["tgt_out"]
        else:
            logits, backward = self.model(b["x"], train=True)
            target = b["y"]
        loss, count, grad_fn = cross_entropy_fused(logits, target, ignore_index=0, inplace=True)
        return float(loss), float(count), grad_fn, backward

    def step(self, comm=None, reducer=None) -> tuple[float, float]:
        t0 = time.perf_counter()
        comm_s = 0.0
        if reducer is not None:
            reducer.begin(sync=True)
        self.store.zero_grad()
        loss, count, grad_fn, backward = self._loss()
        if comm is not None:  # the global loss sum and target count, as the worker loop does
            self._buf[:] = loss, count
            tc = time.perf_counter()
            comm.allreduce(self._buf)
            comm_s += time.perf_counter() - tc
            count = self._buf[1]
        backward(grad_fn(1.0 / count))
        if reducer is not None:
            reducer.finish()
            comm_s += reducer.comm_wait_s + reducer.launch_s
        self.opt.step()
        return time.perf_counter() - t0, comm_s


# -- inside the ranks (a launcher target: MPI or Ray) ------------------------------------------------------------------
def scaling_rank(ctx) -> dict:
    """args: config, steps, rounds, warmup, bucket_mb, out (rank 0 writes the JSON result there)."""
    a = ctx.args
    comm = ctx.comm
    s = Stepper(a["config"], seed=ctx.rank)
    comm.broadcast(s.store.data)
    reducers = {"comm": GradReducer(comm, s.store, s.model, bucket_mb=a["bucket_mb"], overlap=True),
                # one bucket holding the whole gradient, reduced after backward: no bucketing, no overlap
                "nobucket": GradReducer(comm, s.store, s.model, bucket_mb=1e6, overlap=False)}
    times: dict[str, list] = {m: [] for m in MODES}

    def run(mode: str, n: int, record: bool) -> None:
        for _ in range(n):
            if mode == "nocomm":
                st, cs = s.step()
            else:
                st, cs = s.step(comm, reducers[mode])
            if record:
                times[mode].append((st, cs))
            ctx.step += 1

    for mode in MODES:
        run(mode, a["warmup"], record=False)
    for _ in range(a["rounds"]):
        for mode in MODES:
            comm.barrier()  # every mode starts together: no rank's wait for a straggler counts as its comm time
            run(mode, a["steps"], record=True)
    mine = {m: {"step_s": statistics.median(t for t, _ in v), "comm_s": statistics.median(c for _, c in v),
                "comm_share": statistics.median(c / t for t, c in v)} for m, v in times.items()}
    mine["buckets"] = len(reducers["comm"].buckets)
    everyone = comm.allgather_obj(mine)
    if ctx.rank == 0:
        result = {"params": int(s.store.size), "grad_mb": s.store.grad.nbytes / 2 ** 20, "rows_per_rank": s.rows,
                  "buckets": mine["buckets"], "workers": ctx.world_size}
        for m in MODES:
            result[m] = {"step_s": max(r[m]["step_s"] for r in everyone),  # the slowest rank sets the pace
                         "comm_s": max(r[m]["comm_s"] for r in everyone),
                         "comm_share": max(r[m]["comm_share"] for r in everyone)}
        with open(a["out"], "w") as f:
            json.dump(result, f)
        if ctx.reporter is not None:
            ctx.reporter.summary({"steps": ctx.step, "wall_s": 0.0, "final_loss": None, "eval": {}})
    return {"rank": ctx.rank}


def _job(backend: str, args) -> dict:
    """One 2-worker job (1 BLAS thread each) on `backend`; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "scaling.json")
        job = {"config": args.config, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
               "bucket_mb": args.bucket_mb, "out": out}
        target = "ndtrain.launch.bench.scaling:scaling_rank"
        if backend == "mpi":
            rc = run_mpi(target, job, workers=args.workers, run_dir=d, threads=1)
        else:
            rc = run_ray(target, job, workers=args.workers, run_dir=d, threads=1)
            with open(os.path.join(d, rundir.TOPOLOGY)) as f:
                transport = json.load(f).get("transport")
        if rc != 0:
            raise RuntimeError(f"the {backend} scaling job failed (see above)")
        with open(out) as f:
            result = json.load(f)
    if backend == "ray":
        result["transport"] = transport
    return result


def single_worker(args, threads: int) -> dict:
    """1 worker, `threads` BLAS threads, in this process: median step time over rounds x steps."""
    s = Stepper(args.config, seed=0)
    with threadpool_limits(limits=threads, user_api="blas"):
        for _ in range(args.warmup):
            s.step()
        t = [s.step()[0] for _ in range(args.rounds * args.steps)]
    return {"threads": threads, "step_s": statistics.median(t), "rows_per_step": s.rows}


def summarise(result: dict) -> dict:
    """Ratios: throughput vs the ceiling (comm / nocomm step time), vs 1x1 and 1x2 (samples/s)."""
    one = {f"1x{r['threads']}": r["rows_per_step"] / r["step_s"] for r in result.get("single", [])}
    for backend in ("mpi", "ray"):
        r = result.get(backend)
        if not r:
            continue
        tput = r["workers"] * r["rows_per_rank"] / r["comm"]["step_s"]
        r["samples_per_s"] = tput
        r["vs_ceiling"] = r["nocomm"]["step_s"] / r["comm"]["step_s"]
        r["nobucket_vs_ceiling"] = r["nocomm"]["step_s"] / r["nobucket"]["step_s"]
        for k, v in one.items():
            r[f"speedup_vs_{k}"] = tput / v
    result["single_samples_per_s"] = one
    return result


def main(args) -> int:
    result: dict = {"config": args.config, "bucket_mb": args.bucket_mb,
                    "note": "ratios within one run; the machine is shared, so absolute times are noisy"}
    # 1-worker runs alternate with the jobs, so a drift of the machine does not hit one kind of figure only
    plan = ([("single", 1)] if not args.no_single else []) + ([("mpi", 0)] if not args.no_mpi else []) + \
        ([("single", 2)] if not args.no_single else []) + ([("ray", 0)] if not args.no_ray else [])
    for what, threads in plan:
        if what == "single":
            result.setdefault("single", []).append(single_worker(args, threads))
        else:
            result[what] = _job(what, args)
    summarise(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_tables(result)
    return 0


def print_tables(result: dict) -> None:
    c = result["config"]
    print(f"data-parallel scaling, config {c}, 1 BLAS thread per worker, per-worker batch fixed; "
          f"median step time (slowest rank); {result['note']}")
    for r in result.get("single", []):
        print(f"  1 worker x {r['threads']} thread(s): {r['step_s'] * 1e3:8.1f} ms/step  "
              f"{r['rows_per_step'] / r['step_s']:8.1f} samples/s")
    for backend in ("mpi", "ray"):
        r = result.get(backend)
        if not r:
            continue
        via = f" via {r['transport']}" if r.get("transport") else ""
        print(f"  {backend}{via}: {r['workers']} workers x 1 thread, {r['grad_mb']:.2f} MB of gradients in "
              f"{r['buckets']} bucket(s) of <= {result['bucket_mb']} MB")
        for m in MODES:
            x = r[m]
            print(f"    {m:9s} {x['step_s'] * 1e3:8.1f} ms/step   comm {x['comm_s'] * 1e3:7.2f} ms "
                  f"({100 * x['comm_share']:5.1f}% of the step)")
        singles = "  ".join(f"{k.replace('speedup_vs_', 'vs ')} {v:.2f}x" for k, v in r.items()
                            if k.startswith("speedup_vs_"))
        print(f"    throughput {r['samples_per_s']:.1f} samples/s = {r['vs_ceiling']:.3f}x the ceiling "
              f"(no bucketing: {r['nobucket_vs_ceiling']:.3f}x)  {singles}")
