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
