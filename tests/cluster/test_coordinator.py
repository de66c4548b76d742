"""Coordinator: aggregation across ranks, run-directory outputs, and failure detection (error, crash, silence)."""
import json
import time

import pytest

from ndtrain.cluster.aggregate import StepAggregator, aggregate
from ndtrain.cluster.coord_server import dial
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.metrics_channel import RankReporter, encode
from ndtrain.launch.progress import TeeSink, TensorBoardSink
from ndtrain.launch.rundir import RunWriter, read_metrics, read_summary
from helpers.tensorboard import tb_scalars


def test_aggregate_loss_over_all_tokens_slowest_rank_and_throughput():
    rec = aggregate({
        1: {"step": 4, "loss_sum": 30.0, "count": 10, "tokens": 10, "step_time": 0.5, "comm_time": 0.1,
            "lr": 9.0},
        0: {"step": 4, "loss_sum": 10.0, "count": 30, "tokens": 30, "step_time": 0.25, "comm_time": 0.05,
            "lr": 1.0},
    })
    assert rec["loss"] == pytest.approx(40.0 / 40)  # not the mean of per-rank means (1.67)
    assert rec["count"] == 40 and rec["tokens"] == 40
    assert rec["step_time"] == 0.5
    assert rec["tokens_per_s"] == pytest.approx(10 / 0.5 + 30 / 0.25)
    assert rec["comm_share"] == pytest.approx(0.2)
    assert rec["lr"] == 1.0  # pass-through keys come from the lowest rank
    assert rec["reporting_ranks"] == 2  # how many ranks the record aggregates (named for what it counts)


def test_step_aggregator_waits_for_every_reporting_rank():
    agg = StepAggregator([0, 1])
    assert agg.add(0, {"step": 1, "loss_sum": 1.0, "count": 1}) == []
    assert agg.add(0, {"step": 1, "eval": {"loss": 2.0}}) == []  # eval is a separate group
    out = agg.add(1, {"step": 1, "loss_sum": 3.0, "count": 1})
    assert len(out) == 1 and out[0]["loss"] == 2.0
    left = agg.flush_all()
    assert len(left) == 1 and left[0]["partial"] and left[0]["eval"] == {"loss": 2.0}


def _pump(coord, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        coord.poll(0.05)
    assert until(), "coordinator did not reach the expected state in time"


def test_coordinator_writes_run_directory(tmp_path):
    sinks = TeeSink([RunWriter(tmp_path), TensorBoardSink(tmp_path / "tb")])  # what the launcher gives it
    coord = Coordinator(2, writer=sinks, ranks_file=tmp_path / "ranks.json").start()
    reps = [RankReporter(coord.address, coord.token, r, 2) for r in range(2)]
    for step in (1, 2, 3):
        for r, rep in enumerate(reps):
            rep.log({"step": step, "loss_sum": float(step * (r + 1)), "count": 2, "tokens": 2,
                     "step_time": 0.1, "comm_time": 0.01})
    reps[0].summary({"steps": 3, "wall_s": 1.0, "final_loss": 4.5, "eval": {}})
    for rep in reps:
        rep.close()
    _pump(coord, lambda: coord.finished or coord.failure)
    coord.close()
    assert coord.failure is None
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] == pytest.approx((3 + 6) / 4)
    summary = read_summary(tmp_path)
    assert summary["final_loss"] == 4.5 and summary["world_size"] == 2
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["pid"] and r["host"] for r in ranks)
    tags = tb_scalars(tmp_path / "tb")  # TensorBoard events
    assert [v for _, v in tags["train/loss"]] == pytest.approx([r["loss"] for r in rows])
    # the count of ranks a record aggregates is named for what it counts (a 2-rank run read "ranks 1" before)
    assert "train/ranks" not in tags and [v for _, v in tags["train/reporting_ranks"]] == [2, 2, 2]


def test_reported_exception_names_rank_step_and_traceback(tmp_path):
    coord = Coordinator(2, ranks_file=tmp_path / "ranks.json").start()
    reps = [RankReporter(coord.address, coord.token, r, 2) for r in range(2)]
    try:
        raise ValueError("boom in the loss")
    except ValueError as e:
        reps[1].error(7, e)
    _pump(coord, lambda: coord.failure is not None)
    msg = coord.failure.message()
    assert coord.failure.rank == 1 and coord.failure.step == 7
    assert "rank 1" in msg and "step 7" in msg and "ValueError: boom in the loss" in msg
    reps[0].close()
    coord.close()


def test_crashed_rank_is_detected_by_its_closed_connection(tmp_path):
    coord = Coordinator(2, ranks_file=tmp_path / "ranks.json").start()
    ok = RankReporter(coord.address, coord.token, 0, 2)
    raw = dial("127.0.0.1", coord.port, coord.token, 1)
    raw.sendall(encode({"type": "hello", "rank": 1, "host": "h", "pid": 1}))
    raw.sendall(encode({"type": "log", "rank": 1, "record": {"step": 5}}))
    raw.close()  # died without "done" or "error"
    _pump(coord, lambda: coord.failure is not None)
    assert coord.failure.rank == 1 and coord.failure.step == 5 and "ended without reporting" in coord.failure.reason
    ok.close()
    coord.close()


def test_silent_rank_fails_the_job_naming_it(tmp_path):
    coord = Coordinator(2, ranks_file=tmp_path / "ranks.json", heartbeat_timeout=0.5).start()
    ok = RankReporter(coord.address, coord.token, 0, 2, heartbeat_s=0.1)
    raw = dial("127.0.0.1", coord.port, coord.token, 1)
    raw.sendall(encode({"type": "hello", "rank": 1, "host": "h", "pid": 1}))
    _pump(coord, lambda: coord.failure is not None)  # rank 1 never sends a heartbeat
    assert coord.failure.rank == 1 and "silent" in coord.failure.reason
    raw.close()
    ok.close()
    coord.close()


def test_wrong_token_is_ignored_and_missing_rank_times_out(tmp_path):
    coord = Coordinator(1, ranks_file=tmp_path / "ranks.json", start_timeout=0.5).start()
    with pytest.raises(ConnectionError, match=f"rank 0: cannot reach the coordinator at {coord.address}: it refused"):
        RankReporter(coord.address, "not-the-token", 0, 1, connect_timeout=0.3)
    _pump(coord, lambda: coord.failure is not None)
    assert coord.ranks == {} and "did not connect" in coord.failure.reason and coord.failure.rank == 0
    assert coord.server_stats["refused"] >= 1
    coord.close()
