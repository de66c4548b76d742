"""Open a shard directory: validate everything BEFORE training, then memory-map the shards zero-copy.

The manifest is untrusted input: its structure and every field's type are checked (check_manifest), and the
shard and tokenizer files it names must be plain file names inside the data directory (no directory part, no
'..', not absolute), so a manifest can never make ndtrain open a file elsewhere.

Checks, each a DataError naming the file (and row): no manifest (interrupted prepare), unknown schema version,
missing tokenizer or shard, size or sha256 mismatch (truncated / changed file), not an Arrow IPC file, schema or
row/token count different from the manifest, token id < 0 or >= vocab size, and — with `expect` (the model's
TaskInfo) — a kind, vocabulary or width that differs from the model's.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .columns import DenseColumn, RaggedColumn
from .dataset import Dataset
from .info import KINDS, TaskInfo
from .shards import MANIFEST, SCHEMA_VERSION, DataError, schema_for, sha256_file
from .tokenizer import load_tokenizer


def read_manifest(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise DataError(f"{d}: no such data directory")
    if not path.is_file():
        hint = ""
        if (d / "train" / MANIFEST).is_file():
            hint = f" (`ndtrain data prepare` puts the splits in {d / 'train'} and {d / 'val'})"
        raise DataError(f"{path}: missing — not a prepared data directory, or its prepare was interrupted{hint}")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    check_manifest(m, path)
    return m


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INFO_FIELDS = {f.name: f.type for f in dataclasses.fields(TaskInfo)}


def plain_file_name(name, where: str, field: str) -> str:
    """A file name the manifest may point at: one path component inside the data directory."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: field {field!r} must be a file name, got {name!r}")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or Path(name).is_absolute():
        raise DataError(f"{where}: field {field!r} must be a plain file name inside the data directory, got "
                        f"{name!r}")
    return name


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _need(ok: bool, where: str, field: str, what: str, value) -> None:
    if not ok:
        r = repr(value)
        raise DataError(f"{where}: field {field!r} must be {what}, got {r if len(r) <= 60 else r[:57] + '...'}")


def check_manifest(m, path: Path) -> None:
    """The structure and field types of a manifest.json (as shards.write_dataset writes it); DataError naming the
    file and the field otherwise."""
    where = str(path)
    if not isinstance(m, dict):
        raise DataError(f"{where}: not a manifest (a JSON object expected, got a JSON {type(m).__name__})")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{where}: schema_version {m.get('schema_version')!r}, this ndtrain reads {SCHEMA_VERSION}")
    for key in ("kind", "info", "vocab_size", "shards"):
        if key not in m:
            raise DataError(f"{where}: field {key!r} missing")
    _need(m["kind"] in KINDS, where, "kind", f"one of {', '.join(KINDS)}", m["kind"])
    _need(_uint(m["vocab_size"]), where, "vocab_size", "an integer >= 0", m["vocab_size"])
    info = m["info"]
    _need(isinstance(info, dict), where, "info", "a JSON object", info)
    for key, value in info.items():
        if key not in _INFO_FIELDS:
            raise DataError(f"{where}: field 'info.{key}': unknown key; known: {', '.join(_INFO_FIELDS)}")
        want = _INFO_FIELDS[key]
        if want in ("str", str):
            _need(isinstance(value, str), where, f"info.{key}", "a string", value)
        elif want in ("int", int):
            _need(_uint(value), where, f"info.{key}", "an integer >= 0", value)
        elif want in ("dict", dict):
            _need(isinstance(value, dict), where, f"info.{key}", "a JSON object", value)
    for key in ("name", "kind"):
        if key not in info:
            raise DataError(f"{where}: field 'info.{key}' missing")
    _need(info["kind"] == m["kind"], where, "info.kind", f"the manifest's kind {m['kind']!r}", info["kind"])
    tok = m.get("tokenizer")
    if tok is not None:
        _need(isinstance(tok, dict), where, "tokenizer", "a JSON object or null", tok)
        plain_file_name(tok.get("file"), where, "tokenizer.file")
        _need(_is_hex(tok.get("sha256")), where, "tokenizer.sha256", "a sha256 digest (64 hex digits)",
              tok.get("sha256"))
    shards = m["shards"]
    _need(isinstance(shards, list), where, "shards", "a list", shards)
    if not shards:
        raise DataError(f"{where}: lists no shards")
    for i, e in enumerate(shards):
        f = f"shards[{i}]"
        _need(isinstance(e, dict), where, f, "a JSON object", e)
        plain_file_name(e.get("file"), where, f"{f}.file")
        _need(_uint(e.get("rows")), where, f"{f}.rows", "an integer >= 0", e.get("rows"))
        _need(_is_hex(e.get("sha256")), where, f"{f}.sha256", "a sha256 digest (64 hex digits)", e.get("sha256"))
        for key in ("bytes", "tokens"):
            if key in e:
                _need(_uint(e[key]), where, f"{f}.{key}", "an integer >= 0", e[key])


def _is_hex(v) -> bool:
    return isinstance(v, str) and bool(_HEX64.match(v))


def manifest_info(m: dict) -> TaskInfo:
    return TaskInfo(**m["info"])


def _open_shard(path: Path, entry: dict, schema: pa.Schema, verify: bool) -> pa.RecordBatch:
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced file)")
    if verify and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: sha256 does not match the manifest (file changed or corrupted)")
    try:
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow IPC file, or truncated ({e})") from None
    if not reader.schema.equals(schema):
        raise DataError(f"{path}: schema mismatch: expected {schema.to_string()!r}, found "
                        f"{reader.schema.to_string()!r}")
    batch = batches[0] if len(batches) == 1 else pa.Table.from_batches(batches, schema).combine_chunks().to_batches()[0]
    if batch.num_rows != entry["rows"]:
        raise DataError(f"{path}: {batch.num_rows} rows, the manifest says {entry['rows']}")
    return batch


def _ragged(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    offsets = arr.offsets.to_numpy()  # absolute into arr.values' buffer (the slice offset is included)
    values = arr.values.to_numpy(zero_copy_only=True)
    base = int(offsets[0])
    return offsets.astype(np.int64) - base, values[base:]


def _check_ids(path: Path, name: str, offsets: np.ndarray, values: np.ndarray, vocab: int) -> None:
    if not len(values):
        return
    bad = np.nonzero((values < 0) | (values >= vocab))[0] if (values.min() < 0 or values.max() >= vocab) else ()
    if len(bad):
        k = int(bad[0])
        row = int(np.searchsorted(offsets, k, side="right") - 1)
        raise DataError(f"{path}: row {row}, column {name!r}: token id {int(values[k])} is outside the vocabulary "
                        f"(size {vocab})")


def check_expected(m: dict, expect: TaskInfo | dict, where: str) -> None:
    """The model's TaskInfo (or a dict of its fields) must agree with the data's."""
    want = expect.to_dict() if isinstance(expect, TaskInfo) else dict(expect)
    have = m["info"]
    for key in ("kind", "n_features", "n_outputs", "src_vocab_size", "tgt_vocab_size"):
        if key in want and want[key] not in (None, 0, "") and want[key] != have.get(key):
            what = "vocab mismatch" if "vocab" in key else "mismatch"
            raise DataError(f"{where}: {what}: the model expects {key}={want[key]!r}, the data has "
                            f"{key}={have.get(key)!r}")


def open_dataset(data_dir: str | Path, expect: TaskInfo | dict | None = None, *, verify: bool = True) -> Dataset:
    """Validate DIR (every check above; verify=False skips the sha256 pass) and return a memory-mapped Dataset."""
    d = Path(data_dir)
    m = read_manifest(d)
    where = str(d / MANIFEST)
    info = manifest_info(m)
    if expect is not None:
        check_expected(m, expect, where)
    tokenizer = None
    if m.get("tokenizer"):
        tpath = d / plain_file_name(m["tokenizer"]["file"], where, "tokenizer.file")
        if not tpath.is_file():
            raise DataError(f"{tpath}: tokenizer listed in the manifest is missing")
        if sha256_file(tpath) != m["tokenizer"]["sha256"]:
            raise DataError(f"{tpath}: sha256 does not match the manifest")
        try:
            tokenizer = load_tokenizer(tpath)
        except ValueError as e:
            raise DataError(str(e)) from None
        if tokenizer.vocab_size != m["vocab_size"]:
            raise DataError(f"{tpath}: vocab size {tokenizer.vocab_size}, the manifest says {m['vocab_size']}")
    schema = schema_for(info)
    parts: dict[str, list] = {name: [] for name in schema.names}
    for entry in m["shards"]:
        path = d / plain_file_name(entry["file"], where, "shards[].file")
        batch = _open_shard(path, entry, schema, verify)
        tokens = 0
        for name in schema.names:
            arr = batch.column(name)
            if info.kind in ("lm", "seq2seq"):
                offsets, values = _ragged(arr)
                _check_ids(path, name, offsets, values, m["vocab_size"])
                tokens += int(offsets[-1])
                parts[name].append((offsets, values))
            elif isinstance(arr, pa.FixedSizeListArray):
                width = arr.type.list_size
                flat = arr.values.to_numpy(zero_copy_only=True)[arr.offset * width:]
                parts[name].append(flat[: len(arr) * width].reshape(len(arr), width))
            else:
                parts[name].append(arr.to_numpy(zero_copy_only=True))
        if tokens != entry.get("tokens", tokens):
            raise DataError(f"{path}: {tokens} tokens, the manifest says {entry['tokens']}")
    columns = {name: (RaggedColumn(p) if info.kind in ("lm", "seq2seq") else DenseColumn(p))
               for name, p in parts.items()}
    return Dataset(info, columns, tokenizer, source=str(d))
