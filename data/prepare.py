"""Built-in task -> shard directory (`ndtrain data prepare`), and the trainer's cache of prepared tasks.

prepare(task, out_dir) writes the train split into out_dir/train and the validation split into out_dir/val, each a
complete shard directory with its own manifest (the train manifest is written last of all). ensure_prepared(task, cache_root, rows, seed) returns a cached directory whose manifest matches
(task, rows, seed, schema version), preparing it first when there is none. It builds in a private temporary
directory and renames it into place, so concurrent callers (several ranks) never see a half-written directory.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .reader import open_dataset, read_manifest
from .shards import MANIFEST, SCHEMA_VERSION, DataError, StagedWrite
from .tasks import DEFAULT_ROWS, generate, task_kind, task_tokenizer

TRAIN_DIR, VAL_DIR = "train", "val"


def default_val_rows(task: str, rows: int | None) -> int | None:
    if task == "digits":
        return None  # the fixed 20 % split
    return max(1, (rows or DEFAULT_ROWS[task]) // 10)


def prepare(task: str, out_dir: str | Path, rows: int | None = None, shard_rows: int = 65536, seed: int = 0,
            val_rows: int | None = -1) -> Path:
    """Generate `rows` training rows (None: the task's default) and val_rows validation rows (-1: a tenth of
    rows; None: the task's default) as shards in out_dir/train and out_dir/val. Returns out_dir."""
    kind = task_kind(task)
    tokenizer = task_tokenizer(task) if kind == "seq2seq" else None
    out = Path(out_dir)
    if val_rows == -1:
        val_rows = default_val_rows(task, rows)
    # both splits are written beside their destinations and swapped in together (an earlier prepare there stays
    # whole if this one fails); val first: the train manifest marks the whole directory complete
    with StagedWrite() as w:
        for split, n, where in (("val", val_rows, out / VAL_DIR), ("train", rows, out / TRAIN_DIR)):
            info, columns = generate(task, n, seed, split)
            source = {"task": task, "split": split, "rows": n, "seed": seed, "schema_version": SCHEMA_VERSION}
            w.write(where, info, columns, shard_rows=shard_rows, tokenizer=tokenizer, source=source)
    return out


def cache_dir_name(task: str, rows: int | None, seed: int) -> str:
    return f"{task}-rows{rows if rows is not None else 'default'}-seed{seed}-v{SCHEMA_VERSION}"


def matches(data_dir: Path, task: str, rows: int | None, seed: int) -> bool:
    try:
        m = read_manifest(data_dir / TRAIN_DIR)
        read_manifest(data_dir / VAL_DIR)
    except DataError:
        return False
    src = m.get("source", {})
    return (src.get("task"), src.get("rows"), src.get("seed"), src.get("split")) == (task, rows, seed, "train")


def ensure_prepared(task: str, cache_root: str | Path, rows: int | None = None, seed: int = 0,
                    shard_rows: int = 65536) -> Path:
    """A directory with validated train/ and val/ shard directories for (task, rows, seed) under cache_root,
    reused when its manifests match."""
    root = Path(cache_root)
    final = root / cache_dir_name(task, rows, seed)
    if matches(final, task, rows, seed):
        try:
            for split in (TRAIN_DIR, VAL_DIR):  # full validation: a damaged cache is rebuilt, not trusted
                open_dataset(final / split)
            return final
        except DataError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prepare(task, tmp, rows=rows, shard_rows=shard_rows, seed=seed)
    if final.exists():  # stale or damaged (or another process just finished one): move it aside
        if matches(final, task, rows, seed):
            try:
                for split in (TRAIN_DIR, VAL_DIR):
                    open_dataset(final / split)
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            except DataError:
                pass
        trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            pass
    try:
        os.replace(tmp, final)
    except OSError:  # another process renamed its copy in first: same content, use it
        shutil.rmtree(tmp, ignore_errors=True)
    if not (final / TRAIN_DIR / MANIFEST).is_file():
        raise DataError(f"{final}: could not prepare task {task!r}")
    return final
