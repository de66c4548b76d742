"""Hardening, end to end through `ndtrain train`: bad configs fail before anything starts (naming the field), bad data
fails before any step (naming the file), corrupt checkpoints are rejected or skipped, the coordinator listens on
localhost and ignores messages without the run token."""
import hashlib
import json
import socket
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch.cli import main
from ndtrain.launch.rundir import read_metrics, read_summary, train_events

BASE = ["train", "--task", "spirals", "--model", "mlp", "--steps", "4", "-q"]


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, field", [
    (["--set", "run.max_nonfinite=0"], "run.max_nonfinite"),
    (["--set", "run.deterministic=true", "--set", "run.micro_batches=6"], "run.micro_batches"),
    (["--set", "run.deterministic=true", "--batch-size", "20"], "run.batch_size"),
    (["--set", "run.deterministic=true", "--set", "run.micro_batches=4", "--backend", "mpi", "--workers", "8"],
     "run.micro_batches"),
    (["--set", "run.deterministic=1"], "run.deterministic"),
    (["--backend", "mpi", "--workers", "0"], "run.workers"),
    (["--backend", "mpi", "--workers", "4", "--batch-size", "2"], "run.batch_size"),
    (["--set", "optim.momentum=2"], "optim.momentum"),
    (["--set", "optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["--set", "run.keep_checkpoints=0"], "run.keep_checkpoints"),
    (["--set", "cluster.bucket_mb=0"], "cluster.bucket_mb"),
    (["--set", "run.dtype=\"float16\""], "run.dtype"),
    (["--set", "cluster.overlap=\"yes\""], "cluster.overlap"),
    (["--set", "optim.betas=[0.9]"], "optim.betas"),
    (["--set", "run.checkpoint_every=-1"], "run.checkpoint_every"),
])
def test_bad_config_fails_before_anything_starts(tmp_path, capsys, args, field):
    """Even with --backend mpi: no run directory, no process; one line naming the field, exit 2."""
    out = tmp_path / "o"
    assert main([*BASE, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {field}" in err and err.count("\n") == 1
    assert not out.exists()


# -- data ----------------------------------------------------------------------------------------------------------
def _prepare(tmp_path, task):
    d = tmp_path / task
    assert main(["data", "prepare", "--task", task, "--out", str(d), "--rows", "200", "--shard-rows", "100"]) == 0
    return d


def _manifest(split_dir):
    return json.loads((split_dir / "manifest.json").read_text())


def _write_manifest(split_dir, m):
    (split_dir / "manifest.json").write_text(json.dumps(m))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_on(tmp_path, data, task, model, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--task", task, "--model", model, "--steps", "3", "--out", str(out), "-q",
               "--set", f"data.dir={json.dumps(str(data))}"])
    err = capsys.readouterr().err
    steps = [r for r in train_events(read_metrics(out)) if "loss" in r] if (out / "metrics.jsonl").exists() else []
    return rc, err, steps


def _missing_shard(d):
    (d / "train" / "shard-00001.arrow").unlink()
    return d / "train" / "shard-00001.arrow", "missing"


def _flipped_byte(d):
    p = d / "train" / "shard-00000.arrow"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x55
    p.write_bytes(bytes(b))
    return p, "sha256 does not match"


def _truncated(d):
    p = d / "val" / "shard-00000.arrow"
    p.write_bytes(p.read_bytes()[:100])
    return p, "truncated"


def _not_arrow(d):
    """Same size, manifest updated to the new hash: only the Arrow reader can tell."""
    p = d / "train" / "shard-00001.arrow"
    p.write_bytes(b"x" * p.stat().st_size)
    m = _manifest(d / "train")
    m["shards"][1]["sha256"] = _sha(p)
    _write_manifest(d / "train", m)
    return p, "not a readable Arrow IPC file"


@pytest.mark.parametrize("damage", [_missing_shard, _flipped_byte, _truncated, _not_arrow])
def test_bad_shards_stop_before_any_step_naming_the_file(tmp_path, capsys, damage):
    d = _prepare(tmp_path, "spirals")
    path, what = damage(d)
    rc, err, steps = _train_on(tmp_path, d, "spirals", "mlp", capsys)
    assert rc == 2 and str(path) in err and what in err and "data.dir" in err
    assert steps == []


def test_val_vocabulary_mismatch_names_the_manifest(tmp_path, capsys):
    d = _prepare(tmp_path, "copy")
    m = _manifest(d / "val")
    m["info"]["src_vocab_size"] += 5
    _write_manifest(d / "val", m)
    rc, err, steps = _train_on(tmp_path, d, "copy", "transformer", capsys)
    assert rc == 2 and str(d / "val" / "manifest.json") in err and "vocab mismatch" in err and steps == []


def test_tokenizer_vocab_size_mismatch_names_the_file(tmp_path, capsys):
    d = _prepare(tmp_path, "copy")
    m = _manifest(d / "train")
    m["vocab_size"] += 1
    _write_manifest(d / "train", m)
    rc, err, _ = _train_on(tmp_path, d, "copy", "transformer", capsys)
    assert rc == 2 and str(d / "train" / "tokenizer.json") in err and "vocab size" in err


def test_token_id_outside_the_vocabulary_names_file_and_row(tmp_path, capsys):
    d = _prepare(tmp_path, "copy")
    p = d / "train" / "shard-00001.arrow"
    table = ipc.open_file(pa.memory_map(str(p))).read_all()
    src = table.column("src").to_pylist()
    src[7][0] = 99  # vocabulary has 14 ids
    table = table.set_column(table.schema.get_field_index("src"), table.schema.field("src"),
                             pa.array(src, type=table.schema.field("src").type))
    with ipc.new_file(str(p), table.schema) as w:
        w.write_table(table)
    m = _manifest(d / "train")
    m["shards"][1].update(sha256=_sha(p), bytes=p.stat().st_size)
    _write_manifest(d / "train", m)
    rc, err, steps = _train_on(tmp_path, d, "copy", "transformer", capsys)
    assert rc == 2 and str(p) in err and "row 7" in err and "token id 99" in err and steps == []


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_resume_run_dir_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--steps", "6", "--checkpoint-every", "2", "--out", str(out), "--set", "run.log_every=2"]) == 0
    npz = out / "checkpoints" / "ckpt-00000006.npz"
    npz.write_bytes(npz.read_bytes()[:-50])  # truncated
    capsys.readouterr()
    # --resume RUN_DIR alone: the run's own config and directory
    assert main(["train", "--resume", str(out), "--steps", "8", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping corrupt checkpoint" in err and npz.name in err and "ckpt-00000004.json" in err
    assert read_summary(out)["steps"] == 8
    # the run's own config (log_every=2) and metrics file: step 6 was dropped and written again by the resumed run
    assert [r["step"] for r in train_events(read_metrics(out))] == [2, 4, 6, 8]


def test_tampered_checkpoint_record_is_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    js = ckpt.latest(out / "checkpoints")
    rec = json.loads(js.read_text())
    rec["loader"]["batches_done"] += 1  # the npz is intact: only the record's own digest can tell
    js.write_text(json.dumps(rec))
    assert main([*BASE, "--steps", "6", "--out", str(out), "--resume", str(js)]) == 2
    err = capsys.readouterr().err
    assert "run.resume" in err and js.name in err and "modified" in err


def test_no_valid_checkpoint_left_is_an_error_naming_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    js = ckpt.latest(out / "checkpoints")
    js.write_text(js.read_text()[:40])
    assert main(["train", "--resume", str(out), "--steps", "6", "-q"]) == 2
    err = capsys.readouterr().err
    assert "run.resume" in err and "no valid checkpoint" in err and js.name in err


# -- network exposure ------------------------------------------------------------------------------------------
def test_coordinator_listens_on_localhost_and_requires_the_token(tmp_path):
    from ndtrain.cluster.coordinator import Coordinator
    from ndtrain.cluster.metrics_channel import encode
    coord = Coordinator(1, ranks_file=tmp_path / "ranks.json", start_timeout=30).start()
    try:
        assert coord._server._srv.getsockname()[0] == "127.0.0.1" and coord.address.startswith("127.0.0.1:")
        for hello in ({"type": "hello", "rank": 0, "host": "h", "pid": 1},  # no token
                      {"type": "hello", "token": coord.token[:-1] + "x", "rank": 0, "host": "h", "pid": 1}):
            raw = socket.create_connection(("127.0.0.1", coord.port))
            try:
                raw.sendall(encode(hello))
                raw.sendall(encode({"type": "log", "rank": 0, "record": {"step": 1, "loss": 0.5}}))
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server may already have dropped the unproven connection: that is the point
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                coord.poll(0.05)
            raw.close()
        assert coord.ranks == {} and coord.records == []
        # control: the same messages after proving the token (HMAC challenge-response) are accepted
        from ndtrain.cluster.coord_server import dial
        raw = dial("127.0.0.1", coord.port, coord.token, 0)
        raw.sendall(encode({"type": "hello", "rank": 0, "host": "h", "pid": 1}))
        deadline = time.monotonic() + 10
        while not coord.ranks and time.monotonic() < deadline:
            coord.poll(0.05)
        assert list(coord.ranks) == [0]
        raw.close()
    finally:
        coord.close()


def test_mpi_launcher_binds_localhost_without_a_hostfile(tmp_path, monkeypatch):
    from ndtrain.launch import launch_mpi
    seen = {}

    class Stop(Exception):
        pass

    class FakeCoordinator:
        def __init__(self, *a, host="?", **k):
            seen["host"] = host
            raise Stop()
    monkeypatch.setattr(launch_mpi, "Coordinator", FakeCoordinator)
    with pytest.raises(Stop):
        launch_mpi.run_mpi("ndtrain.cluster.probe:noop", {}, workers=2, run_dir=tmp_path)
    assert seen["host"] == "127.0.0.1"
