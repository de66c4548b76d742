"""What a checkpoint records beside the parameters, and how a job picks up from one.

    path = save_checkpoint(job, comm, step, skipped_steps, wall_time)   # every rank calls it; rank 0 writes
    restore_job(job, path, rank)                             # params, optimizer, loader, schedule step, RNG

The loop's own state (loader position, schedule step, every rank's RNG, world size, parameter checksum, skipped
steps, wall time so far) is added to `job.meta`, which launch filled with what it knows (config, its hash, data fingerprints, task
info). A job resumes on any world size: the loader state is (epoch, batches_done) of the GLOBAL order; a rank
absent from the checkpoint keeps its freshly seeded RNG.
"""
from __future__ import annotations

from pathlib import Path

from ndtrain.cluster import checkpoint as ckpt


def save_checkpoint(job, comm, step: int, skipped_steps: int, wall_time: float = 0.0) -> Path | None:
    """Rank 0 writes (every rank holds the same parameters and optimizer state); RNG states of all ranks are
    gathered so dropout resumes exactly; wall_time (the run's wall seconds so far) lets a resumed run continue its
    clock. Returns the checkpoint's path on rank 0, None elsewhere."""
    module = job.model.module
    rngs = comm.allgather_obj(ckpt.rng_states(module))
    path = None
    if comm.rank == 0:
        optim_state = job.optimizer.state_dict() if hasattr(job.optimizer, "state_dict") else {}
        meta = {"loader": job.loader.state_dict(), "schedule_step": step,
                "rng": {str(r): s for r, s in enumerate(rngs)}, **_launch_meta(job, "config", "config_hash"),
                "world_size": comm.world_size, "param_checksum": job.store.checksum(),
                "skipped_steps": skipped_steps, "wall_time": wall_time, **_launch_meta(job, "data", "task_info")}
        extra = {k: v for k, v in job.meta.items() if k not in meta}
        s = job.settings
        path = ckpt.save(s.checkpoint_dir, step, job.store, buffers=dict(module.named_buffers()),
                         optim_state=optim_state, meta={**meta, **extra}, keep=s.keep_checkpoints)
    comm.barrier()
    return path


def _launch_meta(job, *keys) -> dict:
    return {k: job.meta[k] for k in keys if k in job.meta}


def restore_job(job, path: str, rank: int) -> None:
    """Load a checkpoint (a file, or a checkpoints directory: its newest valid one) into the job, in place: sets
    job.start_step, job.skipped_steps and job.resumed_from. CheckpointError (or KeyError / ValueError from a damaged record) when it
    does not fit: other data than the job's (job.meta["data"]), other parameter names or shapes."""
    c = ckpt.load_valid(path)
    want = job.meta.get("data")
    if c.meta.get("data") is not None and want is not None and c.meta["data"] != want:
        raise ckpt.CheckpointError(f"{c.path}: written for data {c.meta['data']}, this run has {want} "
                                   f"(different data.dir / task / rows?)")
    ckpt.restore(c, job.store, job.model.module)
    if hasattr(job.optimizer, "load_state_dict"):
        job.optimizer.load_state_dict(c.optim)
    job.loader.load_state_dict(c.meta["loader"])
    ckpt.set_rng_states(job.model.module, c.meta.get("rng", {}).get(str(rank), {}))
    job.start_step = int(c.step)
    job.skipped_steps = int(c.meta.get("skipped_steps", 0))
    job.resumed_from = c.path
    job.wall_before = float(c.meta.get("wall_time", 0.0))
