"""Arrow IPC shards + manifest.json: writing (atomic, manifest last) and the schema of each task kind.

Directory layout:
  DIR/manifest.json          written LAST (an interrupted prepare has no manifest and is never taken as complete)
  DIR/tokenizer.json         text data only; its sha256 is in the manifest
  DIR/shard-00000.arrow ...  one Arrow IPC *file* (uncompressed, one record batch) per shard
Columns: lm `tokens` list<int32>; seq2seq `src`, `tgt` list<int32>; vector `x` fixed_size_list<float32>[D] and `y`
int64 (classification) or fixed_size_list<float32>[K] (regression). Token ids never include BOS/EOS.
Every file goes to a per-process temporary name in DIR first and is moved into place (data.atomic).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .atomic import atomic_write_bytes
from .info import BOS, EOS, PAD, UNK, TaskInfo

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_IDS = {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS}


class DataError(ValueError):
    """A data directory or input file is unusable; the message names the file (and row where it applies)."""


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for half-new shards
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    n = len(columns["x"] if "x" in columns else columns[schema_for(info).names[0]])
    if n == 0:
        raise DataError(f"{out}: no rows to write")
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
    return out


def _json_safe(extra: dict) -> dict:
    # the tokenizer lives in its own file; do not copy it into the manifest
    return {k: v for k, v in extra.items() if k != "tokenizer_json"}
