"""Atomic file writes: the one temp-file + fsync + rename used by every layer (shards and manifests, checkpoints,
config.toml, summary.json, the coordinator's JSON files, reports).

    with atomic_open(path, "wb") as f:       # streaming writers (np.savez, tomli_w.dump, json.dump)
        np.savez(f, **arrays)
    atomic_write_bytes(path, data)           # a buffer already in memory
    atomic_write_text(path, text)            # UTF-8 text

The data goes to `.<name>.tmp` beside the final file (same directory, so the rename never crosses a file system),
is flushed and fsync'ed, and only then renamed over `path` with os.replace. A reader therefore sees the old
complete file or the new complete one, never a prefix; and because the data is on disk before the rename, a
power loss cannot leave the final name pointing at an empty or partial file (the classic ext4 delayed-allocation
case). The directory itself is not fsync'ed: after a power loss the rename may be lost, which leaves the previous
file (an older checkpoint, the previous config) -- a state every reader already handles. If writing fails, the
temp file is removed and the exception propagates; the final name is untouched.

`unique=True` appends the pid to the temp name, for files that several processes may write at once.

Lives in data/ (imported by data, cluster and launch alike) and imports nothing from the package.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temp_path(path: str | os.PathLike, unique: bool = False) -> Path:
    """The temporary name a write of `path` goes through: `.<name>.tmp` (+ `-<pid>` when unique) beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp" + (f"-{os.getpid()}" if unique else ""))


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, unique: bool = False) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename it to `path`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open({path}): mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path, unique)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, unique: bool = False) -> None:
    with atomic_open(path, "wb", unique=unique) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> None:
    with atomic_open(path, "w", unique=unique) as f:
        f.write(text)
