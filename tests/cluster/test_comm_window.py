"""Communication figures in the training records (cluster/trainer.py with counters.CommWindow): bytes sent and
received per step and the time blocked per step, from the transport's own counters, with evaluation's collectives
left out as its time is."""
import pytest

from helpers.runs import train
from ndtrain.cluster.comm.counters import CommCounters, CommWindow
from ndtrain.launch.rundir import read_metrics, read_summary


def test_window_per_step_leaves_out_what_was_aside():
    c = CommCounters()
    w = CommWindow(c)
    c.add(sent=1000, received=1000, blocked_s=0.2)      # two training steps
    w.aside_begin()
    c.add(sent=50_000, received=50_000, blocked_s=5.0)  # evaluation: not training
    w.aside_end()
    c.add(sent=1000, received=3000, blocked_s=0.2)
    assert w.per_step(2) == {"comm_sent_bytes": 1000.0, "comm_recv_bytes": 2000.0,
                             "comm_blocked_s": pytest.approx(0.2)}
    w.reset()
    assert w.per_step(1) == {"comm_sent_bytes": 0.0, "comm_recv_bytes": 0.0, "comm_blocked_s": 0.0}


def test_one_worker_records_no_bytes(tmp_path):
    out = train(tmp_path / "one", "--task", "spirals", "--model", "mlp", "--steps", "6", "--set", "run.log_every=3")
    recs = [r for r in read_metrics(out) if "step_time" in r]
    assert recs and all(r["comm_sent_bytes"] == 0 and r["comm_recv_bytes"] == 0 for r in recs)


def test_two_mpi_workers_record_the_gradient_bytes_per_step(tmp_path, mpi_ok):
    out = train(tmp_path / "two", "--task", "spirals", "--model", "mlp", "--steps", "8", "--backend", "mpi",
                "--workers", "2", "--set", "run.log_every=4", "--set", "run.eval_every=4")
    recs = [r for r in read_metrics(out) if "step_time" in r]
    params = read_summary(out)["params"]
    grad_bytes = 4 * params  # float32; with W = 2 a bandwidth-optimal all-reduce sends N and receives N
    assert len(recs) == 2
    for r in recs:
        assert grad_bytes <= r["comm_sent_bytes"] < grad_bytes + 4096  # + the [loss, count, stop] all-reduce
        assert r["comm_recv_bytes"] == r["comm_sent_bytes"]
        assert r["comm_blocked_s"] > 0


@pytest.mark.parametrize("flags, share", [(["--compress", "fp16"], 0.5), (["--sync-every", "4"], 0.25)])
def test_fewer_bytes_with_compression_or_sync_every_under_mpi(tmp_path, mpi_ok, flags, share):
    """Real MPI ranks: fp16 payloads all-gathered (2 bytes a value, W = 2: N/2 each way) and DiLoCo's one
    parameter all-reduce every 4 steps move the share of the float32 gradient's bytes they promise; both end with
    one checksum on every rank."""
    out = train(tmp_path / "c", "--task", "spirals", "--model", "mlp", "--steps", "8", "--backend", "mpi",
                "--workers", "2", "--set", "run.log_every=4", *flags)
    recs = [r for r in read_metrics(out) if "step_time" in r]
    summary = read_summary(out)
    grad_bytes = 4 * summary["params"]
    assert len(recs) == 2
    for r in recs:
        assert share * grad_bytes <= r["comm_sent_bytes"] < share * grad_bytes + 4096
    assert summary["link"]["bandwidth_Bps"] > 0
    import json
    assert json.loads((out / "topology.json").read_text())["link"] == summary["link"]
