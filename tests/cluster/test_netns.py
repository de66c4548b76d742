"""Across hosts, not just processes: bench/netns_cluster.py makes two network namespaces joined by a veth pair
("hosts" a and b, each with its own hostname), runs a Ray cluster (head in a, worker node in b) and an MPI job with
a two-host hostfile, each training a tiny float64 transformer with one worker per host, and compares the final
parameters with a 1-worker run (within 1e-6 relative). Slow (Ray start-up in two namespaces); needs root and `ip`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "netns_cluster.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
]


@pytest.mark.timeout(900)
def test_two_host_ray_and_mpi_jobs_equal_one_worker(tmp_path):
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} not found (tests run outside the source tree)")
    out = tmp_path / "netns.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          timeout=850)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    by_backend = {r["backend"]: r for r in report["results"]}
    assert sorted(by_backend) == ["mpi", "ray"]
    for backend, r in by_backend.items():
        assert r["ok"], f"{backend}: {r}\n{proc.stderr[-4000:]}"
        assert r["max_rel_diff"] <= 1e-6
        assert len({x["host"] for x in r["ranks"]}) == 2  # one worker on each "host"
    assert by_backend["ray"]["transport"] == "tcp"  # two Ray nodes: gradients over TCP, not shared memory
    assert proc.returncode == 0
    # torn down: none of the script's namespaces is left
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "ndh1" not in listed


@pytest.mark.timeout(600)
def test_an_elastic_ray_run_survives_host_b_and_grows_back_when_it_returns(tmp_path):
    """--elastic: host b's Ray node killed at step 40, started again; the run shrinks 2 -> 1, grows 1 -> 2, ends
    bitwise equal to a 1-worker run (docs/elastic.md, Proof)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} not found (tests run outside the source tree)")
    out = tmp_path / "netns.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--elastic", "--json", str(out)], capture_output=True,
                          text=True, timeout=550)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["ok"] and r["bitwise_equal"], f"{r}\n{proc.stderr[-4000:]}"
    assert [(e["change"], e["world_size"]) for e in r["events"]] == [("shrink", 1), ("grow", 2)]
    assert r["summary"]["restarts"] == 0 and r["death_to_shrink_event_s"] < 30
    assert proc.returncode == 0
    assert "ndh1" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
