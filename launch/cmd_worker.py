"""`ndtrain worker --config FILE.toml`: one rank of a job whose processes someone else started.

    mpirun -n 4 ndtrain worker --config runs/x/config.toml       # on a cluster, by hand
    ndtrain worker --config runs/x/config.toml                    # no MPI: a single local worker

Under mpirun/mpiexec (detected from the environment it sets) the ranks talk through MPI; otherwise the worker runs
alone (world size 1). With a coordinator address in the environment (NDTRAIN_COORD_ADDR, set by `ndtrain train
--backend mpi`), rank 0 reports metrics there; without one, rank 0 writes the run directory itself.
"""
from __future__ import annotations

import os

from ndtrain.launch.cli import UsageError

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


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
    from ndtrain.launch.config import apply_overrides, load_config, validate
    from ndtrain.launch.cmd_train import check_names
    cfg = load_config(args.config)
    apply_overrides(cfg, args.overrides)
    if args.threads is not None:
        cfg.run.threads = args.threads
    if under_mpi():
        from ndtrain.cluster.comm.mpi import MPICommunicator
        comm = MPICommunicator()
        # the config says how many workers it was resolved for; the processes actually started decide
        if comm.world_size != cfg.run.workers:
            cfg.run.workers = comm.world_size
        if cfg.run.backend == "local" and comm.world_size > 1:
            cfg.run.backend = "mpi"
    else:
        from ndtrain.cluster.comm.local import LocalCommunicator
        comm = LocalCommunicator()
        cfg.run.workers, cfg.run.backend = 1, "local"
    validate(cfg)
    check_names(cfg)
    sink = None
    try:
        from ndtrain.cluster.metrics_channel import RankReporter
        sink = RankReporter.from_env(comm.rank, comm.world_size, reports=comm.rank == 0)
    except ImportError:
        pass
    from ndtrain.cluster.worker import run_worker
    try:
        summary = run_worker(cfg, comm, sink, write_config=sink is None, verbose=not args.quiet and comm.rank == 0)
    except UsageError:
        raise
    except BaseException as e:
        if sink is not None:
            sink.error(-1, e)
            sink.close(done=False)
        if comm.world_size > 1 and hasattr(comm, "abort"):
            import traceback
            traceback.print_exc()
            comm.abort(1)  # the other ranks would otherwise wait in a collective forever
        raise
    finally:
        if sink is not None:
            sink.close()
    if comm.rank == 0 and not args.quiet:
        ev = " ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items())
        print(f"done: {summary['steps']} steps; eval {ev}; run directory {cfg.run.out}")
    return 0
