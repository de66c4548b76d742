"""The data side of the training loop, from the config: the task's datasets, this rank's loader, its share of the
validation rows, and the fingerprint ranks (and checkpoints) compare.

    info, train, val = load_task_data(cfg)                 # data.dir, the shard cache, or generated in memory
    loader = make_loader(train, cfg, rank, world)          # rank r's share of every global batch
    for batch in eval_batches(val, cfg, rank, world): ...  # every validation row once, over all ranks
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ndtrain import data as nd
from ndtrain.cluster.deterministic import MicroBatchLoader
from ndtrain.data.loader import Loader
from ndtrain.data.plan import rank_share
from ndtrain.data.prepare import TRAIN_DIR, VAL_DIR, default_val_rows
from ndtrain.launch.config import Config, ConfigError
from ndtrain.launch.presets import preset_names
from ndtrain.launch.suggest import did_you_mean


def load_task_data(cfg: Config):
    """(TaskInfo, train Dataset, val Dataset) from, in order of preference: a prepared shard directory (data.dir,
    with train/ and val/), the shard cache (data.cache: built-in task prepared once, then memory-mapped), or the
    built-in task generated in memory. Bad data is a ConfigError naming the field and the file."""
    check_task_source(cfg)
    run, dcfg = cfg.run, cfg.data
    rows = dcfg.rows or None
    try:
        if dcfg.dir or dcfg.cache:
            root = Path(dcfg.dir) if dcfg.dir else nd.ensure_prepared(run.task, dcfg.cache, rows, run.seed)
            train = nd.open_dataset(root / TRAIN_DIR)
            val = nd.open_dataset(root / VAL_DIR, expect=train.info)  # the same vocabulary / shapes as train
            return train.info, train, val
    except nd.DataError as e:
        raise ConfigError(f"data.{'dir' if dcfg.dir else 'cache'}: {e}") from None
    # the same split sizes as `ndtrain data prepare`, so in-memory and sharded runs see the same rows
    train = nd.as_dataset(nd.generate(run.task, rows, run.seed, "train"))
    val = nd.as_dataset(nd.generate(run.task, default_val_rows(run.task, rows), run.seed, "val"))
    return train.info, train, val


def check_task_source(cfg: Config) -> None:
    """Where the task's rows come from exists: data.dir holds train/, or run.task is a built-in task (the error
    suggests close names and the presets for one's own data)."""
    run, dcfg = cfg.run, cfg.data
    if dcfg.dir:
        if not (Path(dcfg.dir) / TRAIN_DIR).is_dir():
            raise ConfigError(f"data.dir: {dcfg.dir}/{TRAIN_DIR}: no such data directory (give --data DIR, made by "
                              f"`ndtrain data import ... --val-fraction F --out DIR` or `ndtrain data prepare`)")
    elif run.task not in nd.TASKS:
        own = [n for n in preset_names() if n not in nd.TASKS]
        raise ConfigError(f"run.task: unknown task {run.task!r}{did_you_mean(run.task, [*nd.TASKS, *own])}; "
                          f"built-in tasks: {', '.join(nd.TASKS)}; presets for your own data (with --data DIR): "
                          f"{', '.join(own)}")


def data_fingerprint(ds) -> str:
    """What ranks compare at start: the manifest's hash for shards, the row count for in-memory data."""
    manifest = Path(ds.source) / "manifest.json"
    if ds.source != "<memory>" and manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return f"{ds.info.name}:{ds.n_rows()} rows"


def make_loader(dataset, cfg: Config, rank: int, world: int):
    """This rank's share of every global batch (ndtrain.data.loader.Loader: order from (seed, epoch) only); in
    deterministic mode a list of this rank's fixed micro-batches of it (cluster.deterministic.MicroBatchLoader).
    data.bucket / data.max_tokens pick length-bucketed / token-budget seq2seq batches (data/plan.py): still a
    function of (seed, epoch) and the data only, so any worker count sees the same global batches."""
    d = cfg.data
    if (d.bucket or d.max_tokens) and dataset.kind != "seq2seq":
        raise ConfigError(f"data.{'max_tokens' if d.max_tokens else 'bucket'}: length-bucketed batches apply to "
                          f"seq2seq data; task {dataset.info.name!r} is {dataset.kind}")
    if d.max_tokens and cfg.run.deterministic:
        raise ConfigError("data.max_tokens: deterministic mode needs batches of exactly run.batch_size rows; use "
                          "data.bucket = true instead")
    try:
        if cfg.run.deterministic:
            return MicroBatchLoader(dataset, cfg.run.batch_size, rank, world, cfg.run.seed, cfg.run.micro_batches,
                                    bucket=d.bucket, bucket_batches=d.bucket_batches)
        return Loader(dataset, cfg.run.batch_size, rank, world, cfg.run.seed, bucket=d.bucket,
                      bucket_batches=d.bucket_batches, max_tokens=d.max_tokens or None,
                      rows_multiple=d.rows_multiple)
    except ValueError as e:
        raise ConfigError(f"run.batch_size: {e}") from None


def eval_row_count(dataset, cfg: Config) -> int:
    """Validation rows an evaluation covers: all of them, or the first run.eval_rows."""
    n = dataset.n_rows()
    return min(n, cfg.run.eval_rows) if cfg.run.eval_rows else n


def eval_batches(dataset, cfg: Config, rank: int, world: int):
    """Rank r's share of the validation rows [0, eval_row_count): in order, global batches of eval_batch_size * W
    rows, each split by plan.rank_share (every row once, none dropped; a share may be short or empty). A fixed
    prefix of the split, so run.eval_rows takes the same rows - and gives the same sums - on any number of workers
    (the order of Loader.for_eval, which this reproduces for eval_rows = 0)."""
    n, size = eval_row_count(dataset, cfg), cfg.run.eval_batch_size * world
    for start in range(0, n, size):
        rows = rank_share(np.arange(start, min(start + size, n), dtype=np.int64), rank, world)
        if len(rows):
            yield dataset.batch(rows)
