"""Arrow shards: write/read round trip, every bad-input check, rank coverage over shards, the prepare cache."""
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from ndtrain.data import DataError, Loader, TaskInfo, ensure_prepared, generate, open_dataset, prepare, write_dataset
from ndtrain.data.shards import MANIFEST, sha256_file


@pytest.mark.parametrize("task", ["xor", "sine", "reverse"])
def test_round_trip(task, tmp_path):
    info, cols = generate(task, 50, seed=1)
    top = prepare(task, tmp_path / task, rows=50, shard_rows=16, seed=1)
    d = top / "train"
    ds = open_dataset(d, expect=info)
    m = json.loads((d / MANIFEST).read_text())
    assert [s["rows"] for s in m["shards"]] == [16, 16, 16, 2] and m["rows"] == 50
    assert ds.info.kind == info.kind and len(ds) == 50
    if info.kind == "seq2seq":
        for name in ("src", "tgt"):
            for i in range(50):
                np.testing.assert_array_equal(ds.columns[name].row(i), cols[name][i])
        assert m["tokens"] == sum(len(r) for r in cols["src"]) + sum(len(r) for r in cols["tgt"])
        assert m["tokenizer"]["sha256"] == sha256_file(d / "tokenizer.json")
        assert ds.tokenizer.decode(ds.columns["src"].row(0)) == ds.tokenizer.decode(cols["src"][0])
        # batches from shards equal batches from memory
        idx = np.array([3, 40, 17, 0])
        mem = Loader((info, cols), 4).dataset.batch(idx)
        for k, v in ds.batch(idx).items():
            np.testing.assert_array_equal(v, mem[k])
    else:
        np.testing.assert_array_equal(ds.columns["x"].take(np.arange(50)), cols["x"])
        np.testing.assert_array_equal(ds.columns["y"].take(np.arange(50)), cols["y"])
    assert len(open_dataset(top / "val")) == 5
    with pytest.raises(DataError, match="splits in"):  # the top directory is not itself a data set
        open_dataset(top)


def test_lm_shards_round_trip(tmp_path):
    info = TaskInfo("text", "lm", tgt_vocab_size=50, max_tgt_len=8)
    docs = [np.arange(4, 4 + n, dtype=np.int32) % 50 for n in (10, 3, 30, 1)]
    write_dataset(tmp_path, info, {"tokens": docs}, shard_rows=2)
    ds = open_dataset(tmp_path)
    stream = np.concatenate(docs)
    x = np.concatenate([b["x"] for b in Loader.for_eval(ds, 2)])
    np.testing.assert_array_equal(x.ravel(), stream[: x.size])
    assert x.shape == ((len(stream) - 1) // 8, 8)


@pytest.fixture
def shards(tmp_path):
    return prepare("copy", tmp_path / "copy", rows=40, shard_rows=10, seed=0, val_rows=4) / "train"


def _manifest(d):
    return json.loads((d / MANIFEST).read_text())


def _rewrite_manifest(d, m):
    (d / MANIFEST).write_text(json.dumps(m))


def test_missing_manifest_is_not_complete(shards):
    (shards / MANIFEST).unlink()  # what an interrupted prepare leaves
    with pytest.raises(DataError, match="manifest.json.*interrupted"):
        open_dataset(shards)


def test_missing_shard(shards):
    (shards / "shard-00002.arrow").unlink()
    with pytest.raises(DataError, match="shard-00002.arrow.*missing"):
        open_dataset(shards)


def test_sha_mismatch(shards):
    p = shards / "shard-00001.arrow"
    data = bytearray(p.read_bytes())
    data[-200] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001.arrow.*sha256"):
        open_dataset(shards)


def test_truncated_shard(shards):
    p = shards / "shard-00003.arrow"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="shard-00003.arrow.*truncated"):
        open_dataset(shards)


def test_non_arrow_file(shards):
    p = shards / "shard-00000.arrow"
    p.write_bytes(b"this is not arrow" * 10)
    m = _manifest(shards)  # a manifest that vouches for the bad file: the Arrow check itself must catch it
    m["shards"][0].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    _rewrite_manifest(shards, m)
    with pytest.raises(DataError, match="shard-00000.arrow.*not a readable Arrow"):
        open_dataset(shards)


def _replace_shard(d, i, table_or_batch):
    p = d / f"shard-{i:05d}.arrow"
    with ipc.new_file(str(p), table_or_batch.schema) as w:
        w.write(table_or_batch)
    m = _manifest(d)
    m["shards"][i].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    _rewrite_manifest(d, m)


def test_schema_mismatch(shards):
    batch = pa.RecordBatch.from_arrays([pa.array([[4]] * 10, pa.list_(pa.int64())), pa.array([[5]] * 10)],
                                       names=["src", "target"])
    _replace_shard(shards, 1, batch)
    with pytest.raises(DataError, match="shard-00001.arrow.*schema mismatch"):
        open_dataset(shards)


def test_token_id_out_of_vocab_names_row(shards):
    V = _manifest(shards)["vocab_size"]
    src = [[4, 5]] * 10
    src[7] = [4, V]
    batch = pa.RecordBatch.from_arrays([pa.array(src, pa.list_(pa.int32())), pa.array([[4]] * 10, pa.list_(pa.int32()))],
                                       names=["src", "tgt"])
    _replace_shard(shards, 2, batch)
    m = _manifest(shards)
    m["shards"][2]["tokens"] = 30
    _rewrite_manifest(shards, m)
    with pytest.raises(DataError, match=rf"shard-00002.arrow: row 7, column 'src': token id {V}"):
        open_dataset(shards)


def test_vocab_and_kind_mismatch_with_model(shards):
    info = open_dataset(shards).info
    with pytest.raises(DataError, match="vocab mismatch.*tgt_vocab_size=99"):
        open_dataset(shards, expect={"kind": "seq2seq", "tgt_vocab_size": 99})
    with pytest.raises(DataError, match="kind"):
        open_dataset(shards, expect=TaskInfo("x", "classification", n_features=2, n_outputs=2))
    open_dataset(shards, expect=info)  # the matching model is accepted


def test_tokenizer_changed(shards):
    (shards / "tokenizer.json").write_text((shards / "tokenizer.json").read_text().replace("9", "X"))
    with pytest.raises(DataError, match="tokenizer.json.*sha256"):
        open_dataset(shards)


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_ranks_cover_dataset_with_fewer_shards_than_ranks(tmp_path, W):
    # 2 shards, up to 4 ranks: ranks never own shards, they own parts of global batches
    info = TaskInfo("ids", "classification", n_features=1, n_outputs=2)
    n = 37
    write_dataset(tmp_path, info, {"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n) % 2},
                  shard_rows=20)
    ds = open_dataset(tmp_path)
    seen = []
    for r in range(W):
        for b in Loader(ds, 12, rank=r, world_size=W, seed=1, drop_last=False, endless=False):
            seen.append(b["x"][:, 0].astype(int))
    seen = np.concatenate(seen)
    assert sorted(seen) == list(range(n))


def test_ensure_prepared_reuses_and_rebuilds(tmp_path):
    d = ensure_prepared("add", tmp_path, rows=30, seed=2)
    first = (d / "train" / "shard-00000.arrow").stat().st_mtime_ns
    assert ensure_prepared("add", tmp_path, rows=30, seed=2) == d
    assert (d / "train" / "shard-00000.arrow").stat().st_mtime_ns == first  # reused, not rewritten
    assert len(open_dataset(d / "train")) == 30 and len(open_dataset(d / "val")) == 3
    other = ensure_prepared("add", tmp_path, rows=30, seed=3)
    assert other != d
    (d / "train" / MANIFEST).unlink()  # interrupted: rebuilt, not trusted
    assert ensure_prepared("add", tmp_path, rows=30, seed=2) == d and (d / "train" / MANIFEST).is_file()
    (d / "val" / "shard-00000.arrow").write_bytes(b"junk")  # damaged: rebuilt
    open_dataset(ensure_prepared("add", tmp_path, rows=30, seed=2) / "val")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


# -- a new data set is swapped in whole; an old one survives every failure (issue #16) --------------------------------
def _tree(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_write_over_a_data_set_replaces_it_whole(tmp_path):
    d = tmp_path / "d"
    info, cols = generate("xor", 40, seed=0)
    write_dataset(d, info, cols, shard_rows=10)
    assert len(list(d.glob("shard-*.arrow"))) == 4
    write_dataset(d, info, cols, shard_rows=40)  # fewer shards: the old ones must not linger
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "shard-00000.arrow"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old directory left
    assert len(open_dataset(d)) == 40


def test_a_failed_write_leaves_the_old_data_set_byte_identical(tmp_path, monkeypatch):
    from ndtrain.data import shards
    d = tmp_path / "d"
    info, cols = generate("xor", 40, seed=0)
    write_dataset(d, info, cols, shard_rows=10)
    before = _tree(d)
    with pytest.raises(DataError, match="shard_rows"):  # checked before anything is touched
        write_dataset(d, info, cols, shard_rows=0)
    assert _tree(d) == before
    calls = []

    def failing_shard(path, batch):  # the second shard of the new data set fails (an interrupt, a bad disk)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, batch)
    real = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", failing_shard)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(d, info, generate("xor", 40, seed=1)[1], shard_rows=10)
    assert _tree(d) == before and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_directory_with_other_files_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    info, cols = generate("xor", 10, seed=0)
    with pytest.raises(DataError, match="mine.txt"):
        write_dataset(tmp_path, info, cols)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("name", ["../x.arrow", "/etc/passwd", "a/b.arrow", "..", "", 5, "a\\b"])
def test_manifest_file_names_must_stay_inside_the_directory(shards, name):
    d = shards
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][0]["file"] = name
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shards\[0\]\.file"):
        open_dataset(d)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("shards"), "'shards'"),
    (lambda m: m["info"].update(bogus=1), "info.bogus"),
    (lambda m: m.update(tokenizer={"file": "../tokenizer.json", "sha256": "0" * 64}), "tokenizer.file"),
    (lambda m: m["shards"][0].update(bytes=-1), r"shards\[0\]\.bytes"),
    (lambda m: m["info"].update(kind="lm"), "info.kind"),
])
def test_manifest_structure_is_checked(shards, edit, field):
    d = shards
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=field):
        open_dataset(d)


def test_prepare_swaps_both_splits_or_neither(tmp_path, monkeypatch):
    from ndtrain.data import shards
    d = prepare("xor", tmp_path / "p", rows=40, shard_rows=10)
    before = {s: _tree(d / s) for s in ("train", "val")}
    real, calls = shards._write_into, []

    def fail_on_train(out, *a, **k):  # val (written first) succeeds; train fails
        calls.append(out)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(out, *a, **k)
    monkeypatch.setattr(shards, "_write_into", fail_on_train)
    with pytest.raises(OSError):
        prepare("xor", d, rows=40, shard_rows=20, seed=3)
    assert {s: _tree(d / s) for s in ("train", "val")} == before  # val was NOT swapped in alone
    assert sorted(p.name for p in d.iterdir()) == ["train", "val"]


def test_a_failed_rename_undoes_the_renames_already_done(tmp_path, monkeypatch):
    from ndtrain.data import shards
    info, cols = generate("xor", 20, seed=0)
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, info, cols)
    write_dataset(b, info, cols)
    before = (_tree(a), _tree(b))
    real = os.replace

    def replace(src, dst):  # the staged copy of b cannot be moved into place
        if Path(dst) == b and ".tmp-" in Path(src).name:
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)
    monkeypatch.setattr(shards.os, "replace", replace)
    with pytest.raises(OSError), shards.StagedWrite() as w:
        w.write(a, info, generate("xor", 20, seed=5)[1])
        w.write(b, info, generate("xor", 20, seed=5)[1])
    assert (_tree(a), _tree(b)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
