"""A synthetic per-rank program that exercises a backend end to end without a model: each step every rank
all-reduces a rank-dependent gradient-sized buffer, checks the sum, and reports metrics. Used by the launcher tests
(including a rank that raises at a given step) and as a smoke test of a cluster:

    ndtrain's launchers run it as target "ndtrain.cluster.probe:probe_rank" with args
    {"steps": 5, "size": 1000, "fail_rank": -1, "fail_step": -1}
"""
from __future__ import annotations

import time

import numpy as np


def probe_rank(ctx) -> dict:
    a = ctx.args
    steps, size = int(a.get("steps", 5)), int(a.get("size", 1000))
    fail_rank, fail_step = int(a.get("fail_rank", -1)), int(a.get("fail_step", -1))
    W, r = ctx.world_size, ctx.rank
    comm = ctx.comm
    params = np.zeros(size, np.float64)
    if r == 0:
        params[:] = np.arange(size)
    comm.broadcast(params)
    if not np.array_equal(params, np.arange(size)):
        raise RuntimeError(f"rank {r}: broadcast from rank 0 gave different parameters")
    infos = comm.allgather_obj({"rank": r})
    if [i["rank"] for i in infos] != list(range(W)):
        raise RuntimeError(f"rank {r}: allgather_obj returned {infos}")
    grad = np.empty(size, np.float64)
    for step in range(1, steps + 1):
        ctx.step = step
        t0 = time.perf_counter()
        if r == fail_rank and step == fail_step:
            raise RuntimeError(f"probe: deliberate failure on rank {r} at step {step}")
        grad[:] = (r + 1) * step
        tc = time.perf_counter()
        comm.allreduce(grad)
        comm_time = time.perf_counter() - tc
        expected = step * W * (W + 1) / 2
        if not np.all(grad == expected):
            raise RuntimeError(f"rank {r}: all-reduce at step {step} gave {grad[:3]}..., expected {expected}")
        if ctx.reporter is not None:
            ctx.reporter.log({"step": step, "loss_sum": float(r + 1), "count": 1, "tokens": size,
                              "step_time": time.perf_counter() - t0, "comm_time": comm_time})
    comm.barrier()
    if ctx.reporter is not None and r == 0:
        ctx.reporter.summary({"steps": steps, "wall_s": 0.0, "final_loss": None, "eval": {}})
    return {"rank": r, "steps": steps}
