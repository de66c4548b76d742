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

A full disk (ENOSPC, EDQUOT) is a DiskFullError naming the file, the space it needed (`expected_bytes` when the
writer knows it, else what was written when the disk filled) and what is free there; the final name is untouched.

Lives in data/ (imported by data, cluster and launch alike) and imports nothing from the package.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class DiskFullError(OSError):
    """No space left while writing `path`; the message names it, the space needed and the space free."""

    one_line = True  # reported as its message alone, never as a traceback

    def __init__(self, path: str | os.PathLike, needed: int | None, written: int | None = None):
        path = Path(path)
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        except OSError:
            free = None
        need = f"needs {_mb(needed)}" if needed else (f"{_mb(written)} written when it filled" if written else
                                                      "size unknown")
        have = f"{_mb(free)} free" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device ({need}, {have} in {path.parent}); "
                                       f"free some space and retry")
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_path(path: str | os.PathLike, unique: bool = False) -> Path:
    """The temporary name a write of `path` goes through: `.<name>.tmp` (+ `-<pid>` when unique) beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp" + (f"-{os.getpid()}" if unique else ""))


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, unique: bool = False,
                expected_bytes: int | None = None) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename it to `path`.
    expected_bytes: the size about to be written, for the message of a full disk."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open({path}): mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path, unique)
    written = None
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                if is_disk_full(e):
                    written = tmp.stat().st_size if tmp.exists() else None
                raise
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(path, expected_bytes, written) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, unique: bool = False) -> None:
    with atomic_open(path, "wb", unique=unique, expected_bytes=memoryview(data).nbytes) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> None:
    with atomic_open(path, "w", unique=unique, expected_bytes=len(text.encode("utf-8"))) as f:
        f.write(text)
