"""The live straggler view end to end: 2 MPI ranks, rank 1 slowed by the test-only per-rank delay
(NDTRAIN_TEST_STEP_DELAY="1:seconds", cluster/metrics_channel.py) -> one line on the progress output, one event in
metrics.jsonl naming rank 1, summary.json "stragglers"; the same delay on both ranks -> none named. The resume of an
MPI run on another number of workers (docs/elastic.md, "MPI stays fail-fast") is here too: it is what covers a lost
MPI rank."""
import json
import os
import subprocess
import sys

import pytest

from ndtrain.launch.rundir import read_metrics, run_events, train_events


def _run(out, delay: str, *extra, workers: int = 2, backend: str = "mpi", steps: int = 60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDTRAIN_")}
    env.update(NDTRAIN_REPORT="0", NDTRAIN_TENSORBOARD="0")
    if delay:
        env["NDTRAIN_TEST_STEP_DELAY"] = delay
    argv = [sys.executable, "-m", "ndtrain.launch", "train", "--task", "xor", "--model", "mlp", "--backend", backend,
            "--workers", str(workers), "--threads", "1", "--steps", str(steps), "--set", "run.log_every=10",
            "--out", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(150)
def test_slowed_rank_is_named_once_and_an_even_run_names_none(mpi_ok, tmp_path):
    slow = _run(tmp_path / "slow", "1:0.05")  # rank 1: +50 ms a step; an xor step computes in ~1 ms
    assert slow.returncode == 0, slow.stderr[-2000:]
    lines = [ln for ln in (slow.stdout + slow.stderr).splitlines() if ln.startswith("straggler:")]
    assert len(lines) == 1 and "rank 1 on " in lines[0], slow.stdout + slow.stderr
    rows = read_metrics(tmp_path / "slow")
    events = run_events(rows, "straggler")
    assert len(events) == 1  # once per episode, although rank 1 stays slow to the end
    e = events[0]
    assert e["rank"] == 1 and e["host"] and 20 <= e["step"] <= 60
    assert e["compute_s"] >= 0.04 and e["factor"] >= 1.5 and e["median_s"] < 0.04
    assert all("event" not in r for r in train_events(rows)) and len(train_events(rows)) == 6
    summary = json.loads((tmp_path / "slow" / "summary.json").read_text())
    assert [(s["rank"], s["first_step"]) for s in summary["stragglers"]] == [(1, e["step"])]

    even = _run(tmp_path / "even", "0.02", "-q")  # both ranks slowed alike: equal compute
    assert even.returncode == 0, even.stderr[-2000:]
    assert "straggler" not in even.stdout + even.stderr
    assert run_events(read_metrics(tmp_path / "even"), "straggler") == []
    assert json.loads((tmp_path / "even" / "summary.json").read_text())["stragglers"] == []


@pytest.mark.timeout(150)
def test_an_mpi_run_resumes_on_another_number_of_workers(mpi_ok, tmp_path):
    """A run of 2 MPI ranks stopped at its step-20 checkpoint continues with `--resume RUN --workers 1` (local)
    and is the same training as an undisturbed run (deterministic mode: bitwise, whatever W)."""
    det = ("--set", "run.deterministic=true", "--checkpoint-every", "10")
    first = _run(tmp_path / "run", "", *det, "-q", steps=20)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _run(tmp_path / "run", "", *det, "-q", "--resume", str(tmp_path / "run"),
                   workers=1, backend="local", steps=40)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _run(tmp_path / "whole", "", *det, "-q", workers=1, backend="local", steps=40)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 40 and a["world_size"] == 1
    assert a["param_checksum"] == b["param_checksum"]
