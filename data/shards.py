"""Arrow IPC shards + manifest.json: writing (atomic, manifest last) and the schema of each task kind.

Directory layout:
  DIR/manifest.json          written LAST (an interrupted prepare has no manifest and is never taken as complete)
  DIR/tokenizer.json         text data only; its sha256 is in the manifest
  DIR/shard-00000.arrow ...  one Arrow IPC *file* (uncompressed, one record batch) per shard
Columns: lm `tokens` list<int32>; seq2seq `src`, `tgt` list<int32>; vector `x` fixed_size_list<float32>[D] and `y`
int64 (classification) or fixed_size_list<float32>[K] (regression). Token ids never include BOS/EOS.
The whole directory is first written beside DIR (a hidden temporary directory in the same parent) and swapped in
only when complete: re-importing over an existing data set replaces it in one step, and a failed write (bad
argument, full disk, interrupt) leaves the old data set byte for byte as it was. DIR may be new, empty, or hold
only a data set's own files (check_output_dir): a directory with anything else in it is never replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .atomic import DiskFullError, atomic_write_bytes
from .info import BOS, EOS, PAD, UNK, TaskInfo

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_IDS = {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS}


class DataError(ValueError):
    """A data directory or input file is unusable; the message names the file (and row where it applies)."""


# the files of a data set (and write_dataset's temporaries): what may be replaced by a new one
_OWN_FILE = re.compile(r"^(manifest\.json|tokenizer\.json|shard-\d+\.arrow|\..+\.tmp(-\d+)?)$")


def check_output_dir(out_dir: str | Path) -> None:
    """`out_dir` may receive a data set: new, empty, or holding only a data set's own files (an earlier import,
    an interrupted one). DataError naming it otherwise. Nothing is changed."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    try:
        foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.match(p.name))
    except OSError as e:
        raise DataError(f"{out}: cannot read the output directory ({e.strerror or e})") from None
    if foreign:
        raise DataError(f"{out}: holds {foreign[0]!r}, which is not part of an ndtrain data set; write to a new or "
                        f"empty directory (an earlier data set there is replaced whole)")


def _swap_in_all(pairs: list[tuple[Path, Path]]) -> None:
    """Move each complete directory tmp to its out, all or none: an existing out is moved aside first; if a rename
    fails, the ones already done are undone; the old directories are deleted only after every rename succeeded."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for tmp, out in pairs:
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if old is not None:
                    os.replace(old, out)
                raise
            done.append((out, old))
    except BaseException:
        for out, old in reversed(done):
            trash = out.with_name(f".{out.name}.undo-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(out, trash)
            if old is not None:
                os.replace(old, out)
            shutil.rmtree(trash, ignore_errors=True)
        raise
    for _, old in done:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class StagedWrite:
    """Several data sets that replace their destinations together (the train/ and val/ splits of one import):
    each is written complete beside its destination, and all are swapped in when the block ends without an error;
    otherwise none is, and every destination keeps its old content.

        with StagedWrite() as w:
            w.write(out / "train", info, train_columns, tokenizer=tok)
            w.write(out / "val", info, val_columns, tokenizer=tok)
    """

    def __init__(self):
        self.pairs: list[tuple[Path, Path]] = []

    def __enter__(self) -> "StagedWrite":
        return self

    def write(self, out_dir: str | Path, info: TaskInfo, columns: dict, *, shard_rows: int = 65536, tokenizer=None,
              source: dict | None = None) -> Path:
        out = Path(out_dir)
        # everything is checked before anything is touched
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise DataError(f"shard_rows: must be an integer >= 1, got {shard_rows!r}")
        n = len(columns["x"] if "x" in columns else columns[schema_for(info).names[0]])
        if n == 0:
            raise DataError(f"{out}: no rows to write")
        check_output_dir(out)
        if any(o.resolve() == out.resolve() for _, o in self.pairs):
            raise DataError(f"{out}: written twice in one import")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
        except OSError as e:
            raise DataError(f"{out}: cannot create the data directory ({e.strerror or e})") from None
        self.pairs.append((tmp, out))
        try:
            _write_into(tmp, info, columns, n, shard_rows, tokenizer, source)
        except DiskFullError as e:  # name the destination, not the temporary directory
            raise DiskFullError(out / e.path.name, e.needed) from None
        return out

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _swap_in_all(self.pairs)
        finally:
            for tmp, _ in self.pairs:
                shutil.rmtree(tmp, ignore_errors=True)


def schema_for(info: TaskInfo) -> pa.Schema:
    ids = pa.list_(pa.int32())
    if info.kind == "lm":
        return pa.schema([("tokens", ids)])
    if info.kind == "seq2seq":
        return pa.schema([("src", ids), ("tgt", ids)])
    x = pa.list_(pa.float32(), info.n_features)
    y = pa.int64() if info.kind == "classification" else pa.list_(pa.float32(), info.n_outputs)
    return pa.schema([("x", x), ("y", y)])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _list_array(rows: list[np.ndarray]) -> pa.ListArray:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def _fixed_array(a: np.ndarray, width: int) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(len(a), width)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), type=pa.float32()), width)


def record_batch(info: TaskInfo, columns: dict, lo: int, hi: int) -> tuple[pa.RecordBatch, int]:
    """Rows [lo, hi) of tasks.generate-style columns as a record batch; also its token count."""
    schema = schema_for(info)
    if info.kind in ("lm", "seq2seq"):
        arrays, tokens = [], 0
        for name in schema.names:
            part = [np.asarray(r) for r in columns[name][lo:hi]]
            tokens += sum(len(r) for r in part)
            arrays.append(_list_array(part))
    else:
        x = _fixed_array(columns["x"][lo:hi], info.n_features)
        y = columns["y"][lo:hi]
        y = pa.array(np.asarray(y, dtype=np.int64)) if info.kind == "classification" else _fixed_array(y, info.n_outputs)
        arrays, tokens = [x, y], 0
    return pa.RecordBatch.from_arrays(arrays, schema=schema), tokens


def write_shard(path: Path, batch: pa.RecordBatch) -> dict:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    buf = sink.getvalue()
    atomic_write_bytes(path, memoryview(buf), unique=True)
    return {"file": path.name, "rows": batch.num_rows, "bytes": buf.size,
            "sha256": hashlib.sha256(memoryview(buf)).hexdigest()}


def write_dataset(out_dir: str | Path, info: TaskInfo, columns: dict, *, shard_rows: int = 65536,
                  tokenizer=None, source: dict | None = None) -> Path:
    """Write columns as shards + tokenizer + manifest (last) into out_dir. Returns the directory.
    `source` records how the data was made (task, rows, seed, ...), for ensure_prepared's cache check."""
    with StagedWrite() as w:
        return w.write(out_dir, info, columns, shard_rows=shard_rows, tokenizer=tokenizer, source=source)


def _write_into(out: Path, info: TaskInfo, columns: dict, n: int, shard_rows: int, tokenizer, source) -> None:
    tok_entry = None
    if tokenizer is not None:
        text = tokenizer.to_json().encode("utf-8")
        atomic_write_bytes(out / TOKENIZER_FILE, text, unique=True)
        tok_entry = {"file": TOKENIZER_FILE, "kind": tokenizer.kind, "sha256": hashlib.sha256(text).hexdigest()}
    shards = []
    for s, lo in enumerate(range(0, n, shard_rows)):
        batch, tokens = record_batch(info, columns, lo, min(lo + shard_rows, n))
        entry = write_shard(out / f"shard-{s:05d}.arrow", batch)
        entry["tokens"] = tokens
        shards.append(entry)
    vocab = tokenizer.vocab_size if tokenizer is not None else info.tgt_vocab_size
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": info.name,
        "kind": info.kind,
        "columns": {f.name: str(f.type) for f in schema_for(info)},
        "tokenizer": tok_entry,
        "vocab_size": vocab,
        "special_ids": SPECIAL_IDS,
        "info": {k: v for k, v in info.to_dict().items() if k != "extra"} | {"extra": _json_safe(info.extra)},
        "rows": n,
        "tokens": sum(s["tokens"] for s in shards),
        "source": source or {},
        "shards": shards,
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"), unique=True)


def _json_safe(extra: dict) -> dict:
    # the tokenizer lives in its own file; do not copy it into the manifest
    return {k: v for k, v in extra.items() if k != "tokenizer_json"}
