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

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.comm.gather import allgather_array


def save_checkpoint(job, comm, step: int, skipped_steps: int, wall_time: float = 0.0,
                    rank_state: dict | None = None, shared_state: dict | None = None) -> Path | None:
    """Rank 0 writes (every rank holds the same parameters and optimizer state); RNG states of all ranks are
    gathered so dropout resumes exactly; wall_time (the run's wall seconds so far) lets a resumed run continue its
    clock. rank_state: this rank's own arrays (every rank the same keys and shapes), gathered into rank/<r>/<key>;
    shared_state: arrays every rank holds alike, saved as rank 0's optimizer state under their own keys.
    Returns the checkpoint's path on rank 0, None elsewhere."""
    module = job.model.module
    rngs = comm.allgather_obj(ckpt.rng_states(module))
    gathered = gather_rank_state(comm, rank_state or {})
    path = None
    if comm.rank == 0:
        optim_state = job.optimizer.state_dict() if hasattr(job.optimizer, "state_dict") else {}
        optim_state = {**optim_state, **{f"{SHARED}{k}": v for k, v in (shared_state or {}).items()}}
        meta = {"loader": job.loader.state_dict(), "schedule_step": step,
                "rng": {str(r): s for r, s in enumerate(rngs)}, **_launch_meta(job, "config", "config_hash"),
                "world_size": comm.world_size, "param_checksum": job.store.checksum(),
                "skipped_steps": skipped_steps, "wall_time": wall_time, **_launch_meta(job, "data", "task_info")}
        extra = {k: v for k, v in job.meta.items() if k not in meta}
        s = job.settings
        path = ckpt.save(s.checkpoint_dir, step, job.store, buffers=dict(module.named_buffers()),
                         optim_state=optim_state, meta={**meta, **extra}, keep=s.keep_checkpoints,
                         rank_state=gathered)
    comm.barrier()
    return path


SHARED = "loop."  # optimizer-state keys of the loop's own shared state (DiLoCo's anchor and momentum)


def gather_rank_state(comm, state: dict) -> dict[int, dict[str, np.ndarray]]:
    """{rank: its arrays} on every rank; {} when no rank has any. Every rank must hold the same keys and shapes."""
    layout = {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in sorted(state.items())}
    layouts = comm.allgather_obj(layout)
    for r, other in enumerate(layouts):
        if other != layouts[0]:
            raise ValueError(f"rank {r}: its own checkpoint state {other} differs in layout from rank 0's")
    if not layout:
        return {}
    out: dict[int, dict[str, np.ndarray]] = {r: {} for r in range(comm.world_size)}
    for k in sorted(state):
        v = np.ascontiguousarray(state[k])
        rows = allgather_array(comm, v)
        for r in range(comm.world_size):
            out[r][k] = rows[r].reshape(v.shape)
    return out


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
    optim = {k: v for k, v in c.optim.items() if not k.startswith(SHARED)}
    job.shared_state = {k[len(SHARED):]: v for k, v in c.optim.items() if k.startswith(SHARED)}
    saved_world = int(c.meta.get("world_size", 0))
    job.rank_state = c.ranks.get(str(rank), {}) if saved_world == job.world_size else {}
    job.rank_state_world = saved_world
    if hasattr(job.optimizer, "load_state_dict"):
        job.optimizer.load_state_dict(optim)
    job.loader.load_state_dict(c.meta["loader"])
    ckpt.set_rng_states(job.model.module, c.meta.get("rng", {}).get(str(rank), {}))
    job.start_step = int(c.step)
    job.skipped_steps = int(c.meta.get("skipped_steps", 0))
    job.resumed_from = c.path
    job.wall_before = float(c.meta.get("wall_time", 0.0))
