"""Checkpoints without pickle: `ckpt-<step>.npz` (arrays) + `ckpt-<step>.json` (everything else).

npz keys:  param/<name>   every parameter of the ParamStore (tied aliases are one segment: saved once)
           buffer/<name>  module buffers (BatchNorm running statistics, ...)
           optim/<key>    the optimizer's state arrays (moments, momentum buffers)
JSON:      step, files, the npz's sha256, the param layout, buffer and optimizer-state layouts, optimizer scalars,
           the loader state, the schedule step, RNG states, the config and any extra record.

Integrity: the JSON records the npz's sha256 AND a sha256 of its own content (`record_sha256`, over the canonical
JSON of every other field; mandatory), so a truncated or edited file of either kind is rejected with a message
naming it. Every field of the record is type-checked on load (check_record): a wrong type or an `npz` that is not
a plain file name beside the JSON is a CheckpointError naming the file and the field, never a TypeError later.
`load_valid(dir)` (automatic resume) walks back from the newest checkpoint to the newest one that verifies, with a
CheckpointWarning for each one skipped.

Atomic (ndtrain.data.atomic): the npz goes to a temporary name, is fsync'ed and renamed, then the JSON the same
way, LAST. A checkpoint exists only once its JSON exists, so a crash mid-write never leaves a half checkpoint that
`latest()` would pick up. On load the npz's sha256 is checked against the JSON; a mismatch names the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ndtrain.data.atomic import atomic_open

FORMAT = "ndtrain-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d+)\.json$")


class CheckpointError(Exception):
    """A missing, tampered or mismatched checkpoint; the message names the file."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older valid one."""


def _record_digest(record: dict) -> str:
    """sha256 of the JSON record without its own digest field (canonical: sorted keys, no spaces)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Checkpoint:
    step: int
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)  # arrays and scalars, as optimizer.state_dict() gave them
    meta: dict[str, Any] = field(default_factory=dict)  # the JSON record (loader, schedule, rng, config, layout...)
    path: Path | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optim(state: dict) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays go to the npz, everything else (step counters, hyper-parameters) to the JSON."""
    arrays, scalars = {}, {}
    for k, v in (state or {}).items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif isinstance(v, np.generic):
            scalars[k] = v.item()
        else:
            scalars[k] = v
    return arrays, scalars


def save(ckpt_dir: str | os.PathLike, step: int, store, *, buffers: dict[str, np.ndarray] | None = None,
         optim_state: dict | None = None, meta: dict | None = None, keep: int | None = None,
         name: str | None = None) -> Path:
    """Write checkpoint `step` into ckpt_dir; returns the JSON's path. `keep`: prune all but the newest `keep`.
    name: the files' stem instead of ckpt-<step> (e.g. "avg": not listed, pruned or resumed from automatically)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = name or f"ckpt-{int(step):08d}"
    npz, js = ckpt_dir / f"{stem}.npz", ckpt_dir / f"{stem}.json"
    optim_arrays, optim_scalars = _split_optim(optim_state)
    arrays: dict[str, np.ndarray] = {}
    for name, p in store.params.items():
        arrays[f"param/{name}"] = p.data
    for name, b in (buffers or {}).items():
        arrays[f"buffer/{name}"] = np.asarray(b)
    for k, v in optim_arrays.items():
        arrays[f"optim/{k}"] = v

    # expected_bytes: what a full disk's message says the checkpoint needs (the npz's header adds little)
    with atomic_open(npz, "wb", expected_bytes=sum(int(np.asarray(a).nbytes) for a in arrays.values())) as f:
        np.savez(f, **arrays)

    record = {
        "format": FORMAT,
        "step": int(step),
        "npz": npz.name,
        "sha256": _sha256(npz),
        "dtype": str(store.dtype),
        "param_layout": store.layout(),
        "buffer_layout": {n: {"shape": list(np.shape(b)), "dtype": str(np.asarray(b).dtype)}
                          for n, b in (buffers or {}).items()},
        "optim_layout": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in optim_arrays.items()},
        "optim_scalars": optim_scalars,
        **(meta or {}),
    }
    record["record_sha256"] = _record_digest(record)
    with atomic_open(js, "w") as f:
        json.dump(record, f, indent=1)
    if keep:
        prune(ckpt_dir, keep)
    return js


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NPZ_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.npz$")  # ckpt-<step>.npz, or save(name=...)'s (e.g. avg.npz)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_uint(v) -> bool:
    return _is_int(v) and v >= 0


def _is_hex64(v) -> bool:
    return isinstance(v, str) and bool(_HEX64.match(v))


def _is_loader_state(v) -> bool:
    return isinstance(v, dict) and all(_is_uint(v.get(k)) for k in ("epoch", "batches_done"))


# field -> (check, what it must be). Required fields first; the rest are checked when present. The record is
# untrusted input (a file anyone may edit): every field is checked here, so a reader never meets a wrong type.
_REQUIRED = {
    "step": (_is_uint, "an integer >= 0"),
    "npz": (lambda v: isinstance(v, str) and bool(_NPZ_NAME.match(v)),
            "a plain file name NAME.npz beside the JSON (no directory part)"),
    "sha256": (_is_hex64, "a sha256 digest (64 lowercase hex digits)"),
    "record_sha256": (_is_hex64, "a sha256 digest (64 lowercase hex digits); every checkpoint records the hash of "
                                 "its own content"),
}
_OPTIONAL = {
    "dtype": (lambda v: v in ("float32", "float64"), "float32 or float64"),
    "param_layout": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of tables"),
    "buffer_layout": (lambda v: isinstance(v, dict), "a table"),
    "optim_layout": (lambda v: isinstance(v, dict), "a table"),
    "optim_scalars": (lambda v: isinstance(v, dict), "a table"),
    "loader": (_is_loader_state, "a table {epoch, batches_done} of integers >= 0"),
    "schedule_step": (_is_uint, "an integer >= 0"),
    "rng": (lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()),
            "a table of tables (rank -> RNG states)"),
    "config": (lambda v: isinstance(v, dict), "a table"),
    "config_hash": (lambda v: isinstance(v, str), "a string"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "param_checksum": (lambda v: isinstance(v, str), "a string"),
    "skipped_steps": (_is_uint, "an integer >= 0"),
    "data": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
             "a list of strings"),
    "task_info": (lambda v: isinstance(v, dict), "a table"),
}


def check_record(meta: dict, path: Path) -> None:
    """Every field of a checkpoint's JSON record has the type and form save() writes; CheckpointError naming the
    file and the field otherwise (a missing required field, `"sha256": 5`, `"npz": "../x"`, `"loader": "x"`)."""
    for key, (ok, what) in _REQUIRED.items():
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} missing")
        if not ok(meta[key]):
            raise CheckpointError(f"{path}: field {key!r} must be {what}; got {_short(meta[key])}")
    for key, (ok, what) in _OPTIONAL.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: field {key!r} must be {what}; got {_short(meta[key])}")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a JSON), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (JSON first, so a reader never sees a JSON without its npz)."""
    for js in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        npz = js.with_suffix(".npz")
        js.unlink(missing_ok=True)
        npz.unlink(missing_ok=True)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint by its JSON path (or a directory: its latest). Verifies the npz's sha256."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint (ckpt-*.json) in this directory")
        path = found
    if path.suffix == ".npz":
        path = path.with_suffix(".json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not an ndtrain checkpoint (format {fmt!r})")
    check_record(meta, path)
    if _record_digest(meta) != meta["record_sha256"]:
        raise CheckpointError(f"{path}: the record's sha256 does not match its content: the file was modified")
    npz = path.with_name(meta["npz"])
    if not npz.exists():
        raise CheckpointError(f"{npz}: checkpoint data missing (named by {path.name})")
    digest = _sha256(npz)
    if digest != meta["sha256"]:
        raise CheckpointError(f"{npz}: sha256 {digest[:12]}... does not match {meta['sha256'][:12]}... recorded in "
                              f"{path.name}: the file is corrupt or was modified")
    params, buffers, optim = {}, {}, dict(meta.get("optim_scalars", {}))
    try:
        with np.load(npz, allow_pickle=False) as z:
            for key in z.files:
                kind, _, name = key.partition("/")
                {"param": params, "buffer": buffers, "optim": optim}[kind][name] = z[key]
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{npz}: cannot read: {e}") from None
    return Checkpoint(step=int(meta["step"]), params=params, buffers=buffers, optim=optim, meta=meta, path=path)


def load_valid(path: str | os.PathLike) -> Checkpoint:
    """Load for resuming. A checkpoint file: that one (an error if it does not verify). A checkpoints directory:
    the newest checkpoint that verifies; each newer corrupt one is skipped with a CheckpointWarning
    naming it and why. CheckpointError when there is none."""
    path = Path(path)
    if not path.is_dir():
        return load(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint (ckpt-*.json) in this directory")
    errors = []
    for js in reversed(found):
        try:
            c = load(js)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping corrupt checkpoint: {e}", CheckpointWarning, stacklevel=2)
            continue
        if errors:
            warnings.warn(f"resuming from {js} (step {c.step}), the newest valid checkpoint", CheckpointWarning,
                          stacklevel=2)
        return c
    raise CheckpointError(f"{path}: no valid checkpoint; " + "; ".join(errors))


def restore(ckpt: Checkpoint, store, module=None) -> None:
    """Copy parameters (and module buffers) into the live model, in place; errors name the checkpoint."""
    try:
        store.load_state_dict(ckpt.params, strict=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    if module is not None:
        live = dict(module.named_buffers())
        missing = sorted(set(live) - set(ckpt.buffers))
        if missing:
            raise CheckpointError(f"{ckpt.path}: buffers missing: {missing[:5]}")
        for name, buf in live.items():
            if buf.shape != ckpt.buffers[name].shape:
                raise CheckpointError(f"{ckpt.path}: buffer {name!r} shape {ckpt.buffers[name].shape}, "
                                      f"model has {buf.shape}")
            buf[...] = ckpt.buffers[name]


def rng_states(module) -> dict[str, dict]:
    """The bit-generator state of every module that draws random numbers (dropout), keyed by module path."""
    out = {}
    for path, m in module.named_modules():
        rng = getattr(m, "rng", None)
        if isinstance(rng, np.random.Generator):
            out[path or "<root>"] = rng.bit_generator.state
    return out


def set_rng_states(module, states: dict[str, dict]) -> None:
    for path, m in module.named_modules():
        rng = getattr(m, "rng", None)
        key = path or "<root>"
        if isinstance(rng, np.random.Generator) and key in states:
            rng.bit_generator.state = states[key]
