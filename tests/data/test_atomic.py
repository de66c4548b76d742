"""ndtrain.data.atomic: the one temp-file + fsync + rename every layer writes through."""
import os

import pytest

from ndtrain.data import atomic


def test_write_replaces_through_temp_name(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((os.path.basename(a), os.path.basename(b))),
                                                    real_replace(a, b)))
    atomic.atomic_write_text(path, "néw\n")
    assert path.read_bytes() == "néw\n".encode("utf-8")
    assert calls == ["fsync", (".summary.json.tmp", "summary.json")]  # data on disk before the rename
    atomic.atomic_write_bytes(path, memoryview(b"\x00\x01"), unique=True)
    assert path.read_bytes() == b"\x00\x01"
    assert calls[-1] == (f".summary.json.tmp-{os.getpid()}", "summary.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_open(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    with pytest.raises(ValueError, match="config.toml"):
        with atomic.atomic_open(path, "a"):
            pass
