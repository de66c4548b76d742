"""One rank of a training job, from a validated config: build the job (launch/job.py), run it
(cluster/trainer.py). Every backend comes through here: the local backend calls run_worker directly; MPI and Ray
ranks reach train_target through cluster/rank_entry.py, and `ndtrain worker` under a hand-started mpirun does too.

    summary = run_worker(cfg, comm, sink)     # sink None: rank 0 writes the run directory itself
    rank_entry target "ndtrain.launch.worker:train_target", args {"config": path, "resume"?: path}
"""
from __future__ import annotations

import os
from pathlib import Path

import threadpoolctl

from ndtrain.cluster.sink import MetricsSink, NullSink
from ndtrain.cluster.trainer import Trainer
from ndtrain.cluster.worker_process import default_threads, set_up_process_memory
from ndtrain.launch import rundir
from ndtrain.launch.config import Config, from_dict, load_config, write_config as write_config_file
from ndtrain.launch.job import build_job
from ndtrain.launch.progress import Console, TeeSink, TensorBoardSink
from ndtrain.launch.task_data import load_task_data


def resolved_threads(cfg: Config) -> int:
    """BLAS threads of each worker: 1 in deterministic mode (a GEMM's summation order then depends only on its
    shapes), else run.threads, else the one rule of cluster/worker_process.default_threads."""
    return 1 if cfg.run.deterministic else (cfg.run.threads or default_threads(cfg.run.workers))


def tensorboard_enabled(cfg: Config) -> bool:
    return bool(cfg.run.tensorboard) and os.environ.get("NDTRAIN_TENSORBOARD", "1") != "0"


def run_sinks(cfg: Config, console=None, append: bool = False) -> MetricsSink:
    """Where the records of a run go, in the driver or in a rank that writes the run directory itself:
    metrics.jsonl + summary.json (RunWriter), TensorBoard events (run.tensorboard; env NDTRAIN_TENSORBOARD=0 turns
    them off) and the console (launch/progress.py). The coordinator of a distributed run gets the same sinks."""
    writer = rundir.RunWriter(cfg.run.out, append=append)
    parts: list[MetricsSink] = [writer]
    if tensorboard_enabled(cfg):
        parts.append(TensorBoardSink(Path(cfg.run.out) / rundir.TB_DIR))
    if console is not None:
        parts.append(console)
    return writer if len(parts) == 1 else TeeSink(parts)


def run_worker(cfg: Config, comm, sink: MetricsSink | None = None, *, write_config: bool = False, console=None,
               on_ready=None, job=None, data=None, membership=None) -> dict:
    """Train per cfg on this rank. Returns the summary (on every rank).

    The data, model and optimizer are built (and so every config error raised) before anything is written.
    sink: where rank 0's records go (default: the run directory's sinks for rank 0, nothing for the others).
    write_config: rank 0 writes run.out/config.toml (the local backend; the launcher does it otherwise).
    console: a launch.progress.Console that rank 0's own sink feeds (local runs).
    on_ready(trainer): called on rank 0 once everything is built and the run files are written, before step 1.
    Rank 0 always writes run.out/task_info.json (+ tokenizer.json), so the run directory is self-contained.
    job, data: this rank's job and its task data when the caller built them already (the gate, local runs).
    membership: an elastic Ray rank's (cluster/elastic_rank.py), handed to the Trainer."""
    set_up_process_memory()
    with threadpoolctl.threadpool_limits(limits=resolved_threads(cfg), user_api="blas"):
        data = data if data is not None else load_task_data(cfg)
        job = job if job is not None else build_job(cfg, comm.rank, comm.world_size, data)
        trainer = Trainer(job, comm, membership=membership)
        own_sink = sink is None
        if own_sink:
            if comm.rank == 0 and cfg.run.resume:
                rundir.truncate_metrics(cfg.run.out, job.start_step)  # records after the checkpoint are replayed
            sink = run_sinks(cfg, console, append=bool(cfg.run.resume)) if comm.rank == 0 else NullSink()
        if comm.rank == 0:
            if write_config:
                write_config_file(cfg, Path(cfg.run.out) / rundir.CONFIG)
            info, train, _ = data
            rundir.write_run_files(cfg.run.out, info, train.tokenizer)
        trainer.sink = sink
        if on_ready is not None and comm.rank == 0:
            on_ready(trainer)
        try:
            return trainer.run()
        finally:
            if own_sink:
                sink.close()


def train_target(ctx) -> dict:
    """The training job as a cluster/rank_entry target. args: "config" (path to the run's config.toml) or
    "config_data" (Config.to_dict()), optional "resume" (a checkpoint path or directory overriding run.resume: the
    Ray launcher restarting a group) and "quiet". Every rank reports its errors and heartbeats to the coordinator;
    rank 0 its records (the loop logs global figures from rank 0 only). Without a coordinator (a hand-started
    `ndtrain worker`) rank 0 writes the run directory itself and shows the run on a console."""
    args = ctx.args
    cfg = from_dict(args["config_data"]) if "config_data" in args else load_config(args["config"])
    if args.get("resume"):
        cfg.run.resume = str(args["resume"])
    if ctx.reporter is not None:
        return run_worker(cfg, ctx.comm, ctx.reporter, membership=ctx.membership)
    console = Console(cfg.run.steps, "text", quiet=bool(args.get("quiet"))) if ctx.rank == 0 else None
    return run_worker(cfg, ctx.comm, None, write_config=True, console=console)
