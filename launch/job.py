"""Build the job one rank trains (cluster.job.TrainJob) from a validated config: launch builds, cluster runs.

    info, train, val = load_task_data(cfg)
    job = build_job(cfg, rank, world, (info, train, val))   # model, parameters, optimizer, schedule, loader, ...
    summary = Trainer(job, comm, sink).run()

Every config error surfaces here (a ConfigError naming the field), before the trainer's first collective; the
validation gate (launch/gate.py) runs the same builders once in the driver, so a user's mistake is reported before
any worker starts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.checkpoint_meta import restore_job
from ndtrain.cluster.job import LoopSettings, TrainJob
from ndtrain.engine.module import seed_rngs
from ndtrain.engine.params import ParamStore
from ndtrain.launch import rundir
from ndtrain.launch.config import Config, ConfigError, config_hash
from ndtrain.launch.models import build_model, model_names
from ndtrain.launch.optimizer_setup import make_optimizer, make_schedule_fn
from ndtrain.launch.suggest import did_you_mean
from ndtrain.launch.task_data import data_fingerprint, eval_batches, load_task_data, make_loader

TOKENIZER_IN_CHECKPOINT_MAX = 64_000  # characters of tokenizer JSON a checkpoint copies (a BPE one stays in DIR)


def loop_settings(cfg: Config) -> LoopSettings:
    run = cfg.run
    return LoopSettings(steps=run.steps, checkpoint_dir=rundir.checkpoints_dir(run.out), log_every=run.log_every,
                        eval_every=run.eval_every, checkpoint_every=run.checkpoint_every,
                        keep_checkpoints=run.keep_checkpoints, max_nonfinite=run.max_nonfinite,
                        grad_clip=cfg.optim.grad_clip, seed=run.seed, deterministic=bool(run.deterministic),
                        bucket_mb=cfg.cluster.bucket_mb, overlap=cfg.cluster.overlap, compress=cfg.cluster.compress,
                        powersgd_rank=cfg.cluster.powersgd_rank, sync_every=cfg.cluster.sync_every,
                        outer_lr=cfg.cluster.outer_lr, outer_momentum=cfg.cluster.outer_momentum,
                        sync_overlap=cfg.cluster.sync_overlap, sync_delay=cfg.cluster.sync_delay,
                        link_probe_mb=cfg.cluster.link_probe_mb)


def task_info_record(info) -> dict:
    """TaskInfo for the checkpoint (launch/restore.py's fallback when DIR/task_info.json is gone); a large
    tokenizer (BPE) is left to DIR/tokenizer.json rather than copied into every checkpoint."""
    d = info.to_dict()
    if len(d.get("extra", {}).get("tokenizer_json") or "") > TOKENIZER_IN_CHECKPOINT_MAX:
        d["extra"] = {k: v for k, v in d["extra"].items() if k != "tokenizer_json"}
    return d


def check_model_name(name: str) -> None:
    names = model_names()
    if name not in names:
        raise ConfigError(f"run.model: unknown model {name!r}{did_you_mean(name, names)}; known: {', '.join(names)}")


def build_model_for(cfg: Config, info):
    """The TaskModel of run.model for this task; an unknown name is a ConfigError like every other mistake."""
    check_model_name(cfg.run.model)
    try:
        return build_model(cfg.run.model, info, cfg)
    except ValueError as e:  # an engine config's own check (its message names the field)
        raise ConfigError(str(e)) from None


def resume_source(path: str) -> Path:
    """run.resume as checkpoint.load_valid takes it: a run directory means its checkpoints/ directory."""
    p = Path(path)
    if p.is_dir() and rundir.checkpoints_dir(p).is_dir() and not ckpt.list_checkpoints(p):
        return rundir.checkpoints_dir(p)
    return p


def build_job(cfg: Config, rank: int, world: int, data=None) -> TrainJob:
    """Rank `rank` of `world`'s job. data: (info, train, val) already loaded (else load_task_data(cfg))."""
    run = cfg.run
    info, train, val = data if data is not None else load_task_data(cfg)
    model = build_model_for(cfg, info)
    model.set_tokenizer(getattr(train, "tokenizer", None))  # text metrics (BLEU) in evals
    store = ParamStore.from_module(model.module, dtype=np.dtype(run.dtype), seed=run.seed)
    # dropout masks differ per rank (independent noise per share of the batch), reproducibly
    seed_rngs(model.module, int(np.random.SeedSequence([run.seed, rank]).generate_state(1)[0]))
    fingerprints = [data_fingerprint(d) for d in (train, val)]
    digest = config_hash(cfg)
    job = TrainJob(model=model, store=store, optimizer=make_optimizer(cfg.optim, store),
                   lr_at=make_schedule_fn(cfg.optim, run.steps), loader=make_loader(train, cfg, rank, world),
                   eval_batches=lambda: eval_batches(val, cfg, rank, world), settings=loop_settings(cfg),
                   fingerprints={"config": digest, "data": fingerprints},
                   meta={"config": cfg.to_dict(), "config_hash": digest, "data": fingerprints,
                         "task_info": task_info_record(info)},
                   summary={"task": run.task, "model": run.model, "global_batch_size": run.batch_size,
                            "config_hash": digest}, world_size=world)

    def reshard(new_rank: int, new_world: int) -> None:
        job.loader = make_loader(train, cfg, new_rank, new_world)
        job.eval_batches = lambda: eval_batches(val, cfg, new_rank, new_world)
        job.world_size = new_world

    job.reshard = reshard
    if run.resume:
        try:
            restore_job(job, str(resume_source(run.resume)), rank)
        except (ckpt.CheckpointError, KeyError, ValueError) as e:
            raise ConfigError(f"run.resume: {e}") from None
    return job
