"""How a rank process starts, whatever the backend: pin BLAS threads, link to the coordinator, run the target.

A *target* is the per-rank program, named "package.module:function" and called as `function(ctx)` with a
RankContext (as Ray Train runs a function it is handed: this layer never builds a model). The training job is one
target (launch.worker:train_target, which builds the job from the config); tests and benchmarks use cluster.probe. A target
that raises is reported to the coordinator (rank, step, traceback) before the process ends, so the coordinator
ends the whole job with a message naming the rank; nothing is swallowed.

Every rank starts through `start_rank`: MPI ranks as `python -m ndtrain.cluster.rank_entry --target MOD:FUNC --args
JSON` under mpiexec (launch/launch_mpi.py builds that command), Ray ranks as actors (cluster.ray_rank), and the ranks
of a hand-started `mpirun ndtrain worker` (launch/cmd_worker.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .comm.mpi import MPICommunicator  # mpi4py is imported when one is made, not here
from .interrupt import Interrupted, end_rank_if_lost
from .metrics_channel import RankReporter
from .worker_process import default_threads, pin_threads


@dataclass
class RankContext:
    comm: Any  # a cluster.comm Communicator
    reporter: Any  # a RankReporter (log / summary / progress / error / close), or None without a coordinator
    rank: int
    world_size: int
    threads: int
    args: dict = field(default_factory=dict)  # the target's arguments (JSON-able), e.g. {"config": path}
    step: int = 0  # the target updates it, so an exception is reported with the step it happened at
    membership: Any = None  # an elastic Ray rank's cluster.elastic_rank.Membership (None: a fixed group)


class _WatchedHandle:
    def __init__(self, handle, reporter, nbytes: int = 0):
        self._handle, self._reporter, self._nbytes = handle, reporter, nbytes

    def wait(self) -> None:
        self._reporter.enter_comm(self._nbytes)
        try:
            self._handle.wait()
        finally:
            self._reporter.leave_comm()


class WatchedComm:
    """A Communicator that tells the rank's reporter when it blocks in a collective (enter_comm / leave_comm), so
    the coordinator can tell a rank that waits for its peers from the rank they wait for (a hung rank keeps its
    heartbeats going: they come from a thread). Everything else is the wrapped communicator's (`__getattr__`)."""

    def __init__(self, comm, reporter):
        self._comm, self._reporter = comm, reporter
        self.rank, self.world_size = comm.rank, comm.world_size
        counters = getattr(comm, "counters", None)
        if counters is not None and hasattr(reporter, "watch_counters"):
            reporter.watch_counters(counters)  # heartbeats carry the bytes moved: stalls are judged by progress

    def _blocking(self, fn, *args, nbytes: int = 0, **kwargs):
        self._reporter.enter_comm(nbytes)
        try:
            return fn(*args, **kwargs)
        finally:
            self._reporter.leave_comm()

    def allreduce(self, buf) -> None:
        return self._blocking(self._comm.allreduce, buf, nbytes=buf.nbytes)

    def iallreduce(self, buf):
        return _WatchedHandle(self._comm.iallreduce(buf), self._reporter, buf.nbytes)

    def broadcast(self, buf, root: int = 0) -> None:
        return self._blocking(self._comm.broadcast, buf, root, nbytes=buf.nbytes)

    def barrier(self) -> None:
        return self._blocking(self._comm.barrier)

    def allgather_obj(self, obj):
        return self._blocking(self._comm.allgather_obj, obj)

    def close(self) -> None:
        self._comm.close()

    def __getattr__(self, name):  # abort, group, comm, chunk_bytes, ...
        return getattr(self._comm, name)


def watched(comm, reporter):
    """comm wrapped in WatchedComm when there is a reporter that watches (else comm itself)."""
    return WatchedComm(comm, reporter) if reporter is not None and hasattr(reporter, "enter_comm") else comm


def resolve(target: str) -> Callable:
    mod, _, fn = target.partition(":")
    if not mod or not fn:
        raise ValueError(f"target {target!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(mod), fn)


def run_target(target: str, ctx: RankContext):
    """Run target(ctx); report an exception (with ctx.step) to the coordinator, then re-raise."""
    try:
        result = resolve(target)(ctx)
    except Interrupted as e:  # stopped on request at a step boundary, checkpoint written (cluster/interrupt.py)
        if ctx.reporter is not None:
            ctx.reporter.interrupted(e.step)
        end_rank_if_lost()
        return None
    except BaseException as e:
        if ctx.reporter is not None:
            # a target that does not keep ctx.step (train_target: the loop tells the reporter through progress())
            # leaves it at 0; None makes the reporter use the step it last heard of
            ctx.reporter.error(ctx.step or None, e)
            if not ctx.reporter.lost:
                try:
                    e._ndtrain_reported = True  # mpi_main then ends quietly: the coordinator prints it
                except AttributeError:
                    pass
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


def reports(args: dict, rank: int) -> bool:
    """Does this rank send metrics records? args["_reporting"]: "all" (default) or "rank0"."""
    return args.get("_reporting", "all") == "all" or rank == 0


def start_rank(comm, target: str, args: dict, threads: int, membership=None, member: int | None = None):
    """Link this rank to the coordinator (when the environment names one) and run target(ctx); returns its result.
    membership (elastic Ray ranks): gets the reporter, and wraps the communicators of later groups alike; member:
    the rank's id at the coordinator when it differs from comm.rank (a rank that joined an elastic run)."""
    member = comm.rank if member is None else member
    reporter = RankReporter.from_env(member, comm.world_size, reports=reports(args, member))
    if membership is not None:
        membership.reporter = reporter
        membership.wrap = lambda c: watched(c, reporter)
    ctx = RankContext(watched(comm, reporter), reporter, comm.rank, comm.world_size, threads, dict(args),
                      membership=membership)
    return run_target(target, ctx)


def local_ranks() -> int:
    """Ranks on this host, as the MPI launcher's environment says (1 when it says nothing)."""
    return int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("MPI_LOCALNRANKS", "1")))


def reported(e: BaseException) -> bool:
    """Did this rank's coordinator receive the error (run_target reports it before re-raising)?"""
    return bool(getattr(e, "_ndtrain_reported", False))


def mpi_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ndtrain.cluster.rank_entry")
    p.add_argument("--target", required=True, help="package.module:function called as function(ctx)")
    p.add_argument("--args", default="{}", help="JSON object: the target's arguments")
    p.add_argument("--threads", type=int, default=0, help="BLAS threads per rank (0: the default rule)")
    a = p.parse_args(argv)
    threads = a.threads or default_threads(local_ranks())
    pin_threads(threads)
    comm = MPICommunicator()
    try:
        start_rank(comm, a.target, json.loads(a.args), threads)
    except BaseException as e:
        if getattr(e, "one_line", False) and reported(e):
            # a failure that names its cause, and the coordinator has it: the driver prints it as one line, exits 2
            # and ends the other ranks (no traceback, no MPI_ABORT banner)
            return 0
        # the traceback went to the coordinator (and to stderr below); end every rank now rather than leave the
        # others blocked in a collective
        if getattr(e, "one_line", False):
            print(f"ndtrain: rank {comm.rank}: {e}", file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        comm.abort(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(mpi_main())
