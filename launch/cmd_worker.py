"""`ndtrain worker --config FILE.toml`: one rank of a job whose processes someone else started.

    mpirun -n 4 ndtrain worker --config runs/x/config.toml       # on a cluster, by hand
    ndtrain worker --config runs/x/config.toml                    # no MPI: a single local worker

Under mpirun/mpiexec (detected from the environment it sets) the ranks talk through MPI; otherwise the worker runs
alone (world size 1). With a coordinator address in the environment (NDTRAIN_COORD_ADDR, set by `ndtrain train
--backend mpi`), rank 0 reports metrics there; without one, rank 0 writes the run directory itself. The rank starts
the way every rank starts (cluster.rank_entry.start_rank, target launch.worker:train_target).
"""
from __future__ import annotations

import os

from ndtrain.cluster import interrupt
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.comm.mpi import MPICommunicator
from ndtrain.cluster.rank_entry import local_ranks, start_rank
from ndtrain.cluster.worker_process import default_threads, pin_threads
from ndtrain.launch.config import apply_overrides, load_config
from ndtrain.launch.errors import UsageError
from ndtrain.launch.gate import check_config
from ndtrain.launch.progress import format_done
import traceback

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
TARGET = "ndtrain.launch.worker:train_target"


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help="run one rank of a training job (e.g. under mpirun)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's resolved config.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (every rank must get the same overrides)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads for this rank")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=main)


def under_mpi() -> bool:
    return any(k in os.environ for k in MPI_ENV)


def main(args) -> int:
    cfg = load_config(args.config)
    apply_overrides(cfg, args.overrides)
    if args.threads is not None:
        cfg.run.threads = args.threads
    comm = MPICommunicator() if under_mpi() else LocalCommunicator()
    # the config says how many workers it was resolved for; the processes actually started decide
    cfg.run.workers = comm.world_size
    if comm.world_size == 1:
        cfg.run.backend = "local"
    elif cfg.run.backend == "local":
        cfg.run.backend = "mpi"
    check_config(cfg)
    threads = cfg.run.threads or default_threads(local_ranks())
    pin_threads(threads)
    try:
        summary = start_rank(comm, TARGET, {"config_data": cfg.to_dict(), "quiet": bool(args.quiet),
                                            "_reporting": "rank0"}, threads)
    except UsageError:
        raise
    except BaseException:
        if comm.world_size > 1:
            traceback.print_exc()
            comm.abort(1)  # the other ranks would otherwise wait in a collective forever
        raise
    if summary is None:  # stopped on request at a step boundary, with a checkpoint (cluster/interrupt.py)
        return interrupt.exit_code()
    if comm.rank == 0 and not args.quiet:
        print(format_done(summary, cfg.run.out), flush=True)
    return 0
