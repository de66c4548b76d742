"""The start-up link probe and its advice (cluster/link_probe.py), the figures in summary/records/progress lines."""
import threading
import time

import numpy as np
import pytest

from ndtrain.cluster.link_probe import advice, comm_estimate_s, probe_link
from ndtrain.launch.progress import format_step_line
from helpers.runs import make_cfg
from helpers.threads import ThreadComm, ThreadGroup, run_threads


class SlowComm(ThreadComm):
    """A link of ~50 MB/s and 2 ms: each all-reduce sleeps latency + its bytes over the rate."""

    def allreduce(self, buf):
        time.sleep(0.002 + buf.nbytes / 50e6)
        super().allreduce(buf)


def test_probe_measures_the_emulated_link_and_every_rank_agrees():
    g = ThreadGroup(2)
    out = [None, None]

    def go(r):
        out[r] = probe_link(SlowComm(g, r), probe_bytes=2 << 20)
    ts = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    assert out[0] == out[1]
    # 2 (W-1)/W x 2 MB = 2 MB moved in ~2 MB / 50 MB/s: ~50 MB/s (threads and a loaded machine: generous bounds)
    assert 10e6 < out[0]["bandwidth_Bps"] < 60e6
    assert 0.0015 < out[0]["latency_s"] < 0.05


def test_advice_names_the_fixes_only_when_communication_dominates():
    link = {"latency_s": 0.003, "bandwidth_Bps": 25e6}  # good Wi-Fi
    assert comm_estimate_s(link, 4_000_000, 2) == pytest.approx(0.003 + 4e6 / 25e6)
    line = advice(link, 4_000_000, compute_s=0.06, world=2)
    assert line and "--compress" in line and "--sync-every" in line and "--batch-size" in line
    assert advice({"latency_s": 1e-4, "bandwidth_Bps": 3e9}, 4_000_000, compute_s=0.06, world=2) is None


def test_the_advised_local_sgd_flags_are_a_valid_config(tmp_path):
    """The flags the advice names (local SGD: averaging every 8 steps, hidden 2 steps) parse to that config."""
    import re
    import shlex
    from ndtrain.launch.cli import build_parser
    from ndtrain.launch.cmd_train import resolve_config
    from ndtrain.launch.config import validate
    line = advice({"latency_s": 0.003, "bandwidth_Bps": 25e6}, 4_000_000, compute_s=0.06, world=2)
    flags = re.search(r"(--sync-every 8 .*?) \(", line).group(1) + " " + re.search(r"add (--sync-overlap .*?) to", line).group(1)
    argv = ["train", "--task", "spirals", "--workers", "2", "--backend", "ray", "--out", str(tmp_path / "o"),
            *shlex.split(flags)]
    c = validate(resolve_config(build_parser().parse_args(argv))).cluster
    assert (c.sync_every, c.outer_lr, c.outer_momentum, c.sync_overlap, c.sync_delay) == (8, 1.0, 0.0, True, 2)


def test_a_two_rank_run_records_the_link_and_advises(tmp_path, monkeypatch):
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")
    notices = []
    from ndtrain.cluster import trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "probe_link",
                        lambda comm, nbytes: {"latency_s": 0.01, "bandwidth_Bps": 1e5, "probe_bytes": nbytes})
    orig = trainer_mod.Trainer._advise

    def spy(self, record):
        self.sink.notice = notices.append
        return orig(self, record)
    monkeypatch.setattr(trainer_mod.Trainer, "_advise", spy)
    cfgs = [make_cfg(tmp_path, "run.task=\"spirals\"", "run.steps=4", "run.log_every=2", workers=2)
            for _ in range(2)]
    out, errs = run_threads(cfgs)
    assert errs == [None, None]
    assert out[0]["link"]["bandwidth_Bps"] == 1e5
    assert len(notices) == 1 and "advice:" in notices[0]
    from ndtrain.launch.rundir import read_metrics
    rec = [r for r in read_metrics(tmp_path) if "loss" in r][0]
    assert rec["link_bandwidth_Bps"] == 1e5


def test_progress_line_shows_bytes_time_and_link():
    rec = {"step": 10, "loss": 0.5, "lr": 0.1, "tokens_per_s": 1000.0, "step_time": 0.1, "comm_sent_bytes": 3.97e6,
           "comm_blocked_s": 0.064, "link_bandwidth_Bps": 23.1e6}
    assert format_step_line(rec, 20, 1.0).endswith("eta 1s comm 3.97 MB/step 0.064 s (64%) link 23.1 MB/s")
    assert "comm" not in format_step_line({**rec, "comm_sent_bytes": 0}, 20, 1.0)
