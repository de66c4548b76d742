"""How a rank process starts, whatever the backend: pin BLAS threads, link to the coordinator, run the target.

A *target* is the per-rank program, named "package.module:function" and called as `function(ctx)` with a
RankContext. The training loop is one target (cluster.worker); tests and benchmarks use cluster.probe. A target
that raises is reported to the coordinator (rank, step, traceback) before the process ends, so the coordinator
ends the whole job with a message naming the rank; nothing is swallowed.

MPI ranks start as `python -m ndtrain.cluster.rank_entry --target MOD:FUNC --args JSON` under mpiexec
(launch/launch_mpi.py builds that command); Ray ranks are actors (cluster.ray_rank) that call `run_target`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class RankContext:
    comm: Any  # a cluster.comm Communicator
    reporter: Any  # a RankReporter (log / summary / progress / error / close), or None without a coordinator
    rank: int
    world_size: int
    threads: int
    args: dict = field(default_factory=dict)  # the target's arguments (JSON-able), e.g. {"config": path}
    step: int = 0  # the target updates it, so an exception is reported with the step it happened at


def pin_threads(n: int) -> None:
    """Limit BLAS/OpenMP threads of this process to n (env for libraries not loaded yet, threadpoolctl for those
    that are)."""
    n = max(1, int(n))
    for k in THREAD_ENV:
        os.environ[k] = str(n)
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)


def default_threads(workers_on_host: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_host))


def resolve(target: str) -> Callable:
    mod, _, fn = target.partition(":")
    if not mod or not fn:
        raise ValueError(f"target {target!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(mod), fn)


def run_target(target: str, ctx: RankContext):
    """Run target(ctx); report an exception (with ctx.step) to the coordinator, then re-raise."""
    try:
        result = resolve(target)(ctx)
    except BaseException as e:
        if ctx.reporter is not None:
            # a target that does not keep ctx.step (train_target: the loop tells the reporter through progress())
            # leaves it at 0; None makes the reporter use the step it last heard of
            ctx.reporter.error(ctx.step or None, e)
        abort = getattr(ctx.comm, "abort_peers", None) or getattr(getattr(ctx.comm, "group", None), "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:
                pass
        raise
    if ctx.reporter is not None:
        ctx.reporter.close()
    return result


def train_target(ctx: RankContext) -> dict:
    """The training loop as a target: args {"config": path to the run's config.toml}. Rank 0 logs (the loop logs
    global figures from rank 0 only); every rank reports its errors and heartbeats."""
    from ndtrain.cluster.worker import run_worker
    from ndtrain.launch.config import load_config, validate
    cfg = load_config(ctx.args["config"])
    validate(cfg)
    sink = ctx.reporter
    if sink is None:
        from ndtrain.launch.rundir import NullSink
        sink = NullSink()
    return run_worker(cfg, ctx.comm, sink)


def reports(args: dict, rank: int) -> bool:
    """Does this rank send metrics records? args["_reporting"]: "all" (default) or "rank0"."""
    return args.get("_reporting", "all") == "all" or rank == 0


def mpi_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ndtrain.cluster.rank_entry")
    p.add_argument("--target", required=True, help="package.module:function called as function(ctx)")
    p.add_argument("--args", default="{}", help="JSON object: the target's arguments")
    p.add_argument("--threads", type=int, default=0, help="BLAS threads per rank (0: cores // local ranks)")
    a = p.parse_args(argv)
    local_size = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("MPI_LOCALNRANKS", "1")))
    threads = a.threads or default_threads(local_size)
    pin_threads(threads)
    from .comm.mpi import MPICommunicator
    from .metrics_channel import RankReporter
    comm = MPICommunicator()
    args = json.loads(a.args)
    reporter = RankReporter.from_env(comm.rank, comm.world_size, reports=reports(args, comm.rank))
    ctx = RankContext(comm, reporter, comm.rank, comm.world_size, threads, args)
    try:
        run_target(a.target, ctx)
    except BaseException:
        # the traceback went to the coordinator (and to stderr below); end every rank now rather than leave the
        # others blocked in a collective
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        comm.abort(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(mpi_main())
