"""Checkpoints: bitwise round trip without pickle, sha256 verification naming the file, atomic writes, pruning."""
import json
import os

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.engine.layers import Linear
from ndtrain.engine.module import Module, Sequential
from ndtrain.engine.params import ParamStore


class WithBuffer(Module):
    def __init__(self):
        super().__init__()
        self.lin = Linear(3, 4)
        self.register_buffer("running_mean", np.zeros(4, np.float32))
        self.rng = np.random.default_rng(0)


def _model(seed):
    m = Sequential(WithBuffer(), Linear(4, 2))
    store = ParamStore.from_module(m, seed=seed)
    return m, store


def _save(tmp_path, step=10, keep=None):
    m, store = _model(1)
    m[0].running_mean[...] = [1, 2, 3, 4]
    m[0].rng.random(5)  # advance the generator: its state must come back
    optim = {"exp_avg": np.arange(store.size, dtype=np.float32), "t": 10, "lr": np.float64(0.1)}
    meta = {"loader": {"epoch": 1, "batches_done": 3}, "rng": ckpt.rng_states(m), "config": {"run": {"steps": 5}}}
    path = ckpt.save(tmp_path, step, store, buffers=dict(m.named_buffers()), optim_state=optim, meta=meta, keep=keep)
    return m, store, optim, path


def test_round_trip_is_bitwise(tmp_path):
    m, store, optim, path = _save(tmp_path)
    m2, store2 = _model(2)
    assert store2.checksum() != store.checksum()
    c = ckpt.load(path)
    ckpt.restore(c, store2, m2)
    assert store2.data.tobytes() == store.data.tobytes()
    np.testing.assert_array_equal(m2[0].running_mean, [1, 2, 3, 4])
    assert c.optim["exp_avg"].tobytes() == optim["exp_avg"].tobytes() and c.optim["t"] == 10
    assert c.optim["lr"] == 0.1 and c.step == 10 and c.meta["loader"] == {"epoch": 1, "batches_done": 3}
    ckpt.set_rng_states(m2, c.meta["rng"])
    assert m2[0].rng.random() == m[0].rng.random()
    assert c.meta["param_layout"] == store.layout()


def test_loads_without_pickle(tmp_path):
    _, _, _, path = _save(tmp_path)
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
        assert "param/0.lin.W" in z.files and "buffer/0.running_mean" in z.files and "optim/exp_avg" in z.files
    json.loads(path.read_text())  # plain JSON


def test_tampered_npz_is_rejected_naming_the_file(tmp_path):
    _, _, _, path = _save(tmp_path)
    npz = path.with_suffix(".npz")
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=npz.name):
        ckpt.load(path)


def test_missing_npz_and_mismatched_model(tmp_path):
    _, _, _, path = _save(tmp_path)
    m3 = Sequential(Linear(3, 5))
    store3 = ParamStore.from_module(m3)
    with pytest.raises(ckpt.CheckpointError, match=path.name):
        ckpt.restore(ckpt.load(path), store3, m3)
    path.with_suffix(".npz").unlink()
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000010.npz"):
        ckpt.load(path)


def test_atomic_write_no_partial_files(tmp_path, monkeypatch):
    _save(tmp_path, step=1)
    # a crash while writing the JSON of step 2: the npz landed, the JSON did not -> step 2 does not exist
    real_dump = json.dump

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        _save(tmp_path, step=2)
    monkeypatch.setattr(json, "dump", real_dump)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001.json"]
    assert ckpt.latest(tmp_path).name == "ckpt-00000001.json"
    assert ckpt.load(tmp_path).step == 1  # a directory loads its latest complete checkpoint
    # the final names only ever appear through os.replace of a complete temp file
    names = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append((os.path.basename(a), os.path.basename(b))),
                                                    real_replace(a, b)))
    _save(tmp_path, step=3)
    assert names == [(".ckpt-00000003.npz.tmp", "ckpt-00000003.npz"), (".ckpt-00000003.json.tmp",
                                                                        "ckpt-00000003.json")]


def test_keep_last_k(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, step=s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000003.json", "ckpt-00000004.json"]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["ckpt-00000003.npz", "ckpt-00000004.npz"]


# -- the JSON record is untrusted (issue #16) -------------------------------------------------------------------------
def _rewrite(path, edit, rehash):
    rec = json.loads(path.read_text())
    edit(rec)
    if rehash:
        rec["record_sha256"] = ckpt._record_digest(rec)
    path.write_text(json.dumps(rec))


@pytest.mark.parametrize("edit, rehash, field", [
    (lambda r: r.pop("record_sha256"), False, "'record_sha256' missing"),
    (lambda r: (r.pop("record_sha256"), r.update(step=35)), False, "'record_sha256' missing"),
    (lambda r: r.update(sha256=5), True, "'sha256' must be"),
    (lambda r: r.update(loader="x"), True, "'loader' must be"),
    (lambda r: r.update(npz="../x"), True, "'npz' must be"),
    (lambda r: r.update(step=True), True, "'step' must be"),
    (lambda r: r.update(optim_scalars=[]), True, "'optim_scalars' must be"),
])
def test_record_fields_are_type_checked_naming_the_field(tmp_path, edit, rehash, field):
    _, _, _, path = _save(tmp_path)
    _rewrite(path, edit, rehash)
    with pytest.raises(ckpt.CheckpointError, match=field) as e:
        ckpt.load(path)
    assert str(path) in str(e.value)


def test_disk_full_names_the_file_and_the_space_needed(tmp_path, monkeypatch):
    from ndtrain.data.atomic import DiskFullError
    m, store = _model(1)

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError) as e:
        ckpt.save(tmp_path, 3, store)
    msg = str(e.value)
    assert "ckpt-00000003.npz" in msg and "needs" in msg and "free" in msg
    assert list(tmp_path.iterdir()) == []  # no temp file, no half checkpoint
