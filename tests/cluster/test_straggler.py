"""The live straggler view (cluster/straggler.py) on synthetic timings, the coordinator's event and summary, and the
rank side: per-step compute time (step minus time blocked in collectives) sent to a real coordinator, and the
per-rank test delay."""
import math
import time

import pytest

from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.metrics_channel import RankReporter, _test_faults
from ndtrain.cluster.straggler import StragglerWatch, median, straggler_line, weighted_median


def _feed(watch, per_rank: dict, steps: int, every: int = 1, start: int = 0, host=None):
    """Messages of `every` steps each, ranks in turn; per_rank: rank -> compute seconds (or a function of step)."""
    events = []
    for s in range(start + every, start + steps + 1, every):
        for r, v in per_rank.items():
            c = v(s) if callable(v) else v
            ev = watch.observe(r, s, c, every, host=host)
            if ev is not None:
                events.append(ev)
    return events


def test_weighted_median():
    assert weighted_median([(3.0, 1), (1.0, 1), (2.0, 1)]) == 2.0
    assert weighted_median([(1.0, 1), (3.0, 1)]) == 2.0  # even split: the mean of the middle two
    assert weighted_median([(1.0, 5), (100.0, 1)]) == 1.0  # counts are weights
    assert math.isnan(weighted_median([]))
    assert median([5.0]) == 5.0


def test_slow_rank_is_named_after_n_consecutive_steps_with_its_numbers():
    w = StragglerWatch(factor=1.5, steps=20)
    assert _feed(w, {0: 0.010, 1: 0.030}, steps=19) == []  # 19 slow steps: not yet
    ev = _feed(w, {0: 0.010, 1: 0.030}, steps=1, start=19, host="laptop-b")
    assert len(ev) == 1
    e = ev[0]
    assert e["event"] == "straggler" and e["rank"] == 1 and e["host"] == "laptop-b" and e["step"] == 20
    assert e["compute_s"] == pytest.approx(0.030) and e["median_s"] == pytest.approx(0.010)
    assert e["factor"] == pytest.approx(3.0)
    assert w.named == [{"rank": 1, "host": "laptop-b", "first_step": 20, "factor": 3.0}]
    line = straggler_line(e, w.steps)
    assert "rank 1 on laptop-b" in line and "3.0x" in line and "30.0 ms" in line and "step 20" in line


def test_once_per_episode_then_again_after_recovery():
    w = StragglerWatch(factor=1.5, steps=10)
    slow = {0: 0.01, 1: 0.05}
    assert len(_feed(w, slow, steps=100)) == 1  # 100 slow steps: one event, not 91
    assert _feed(w, {0: 0.01, 1: 0.01}, steps=5, start=100) == []  # recovered
    again = _feed(w, slow, steps=30, start=105)
    assert [e["step"] for e in again] == [115]  # 10 slow steps after the recovery
    assert [n["first_step"] for n in w.named] == [10, 115]


def test_a_recovery_in_between_resets_the_count():
    w = StragglerWatch(factor=1.5, steps=10)
    flicker = lambda s: 0.05 if s % 8 else 0.01  # noqa: E731 - slow 7 steps in 8: never 10 in a row
    assert _feed(w, {0: 0.01, 1: flicker}, steps=200) == []


def test_equal_or_mildly_uneven_ranks_are_not_named():
    w = StragglerWatch(factor=1.5, steps=5)
    noisy = {0: lambda s: 0.010 + 0.002 * (s % 3), 1: lambda s: 0.011 + 0.002 * (s % 2), 2: 0.012}
    assert _feed(w, noisy, steps=300) == []
    assert _feed(StragglerWatch(1.5, 5), {0: 0.010, 1: 0.014}, steps=100) == []  # 1.4x < 1.5x


def test_microsecond_steps_are_noise_not_stragglers():
    w = StragglerWatch(factor=1.5, steps=5)
    assert _feed(w, {0: 0.00001, 1: 0.0001}, steps=100) == []  # 10x, but 90 us apart: below floor_s


def test_reference_is_the_median_of_the_other_ranks():
    w = StragglerWatch(factor=1.5, steps=20)
    ev = _feed(w, {0: 0.010, 1: 0.012, 2: 0.011, 3: 0.040}, steps=40, every=10)  # messages of 10 steps each
    assert [e["rank"] for e in ev] == [3]
    assert ev[0]["step"] == 20 and ev[0]["median_s"] == pytest.approx(0.011)


def test_one_long_message_counts_all_its_steps():
    """A timing message covers the steps since the last one (~1 s): 25 slow steps in one message start an episode."""
    w = StragglerWatch(factor=1.5, steps=20)
    w.observe(0, 25, 0.01, 25)
    ev = w.observe(1, 25, 0.03, 25)
    assert ev is not None and ev["rank"] == 1


def test_garbage_timings_are_ignored_and_forget_reset():
    w = StragglerWatch(factor=1.5, steps=2)
    for bad in (None, "nan", float("nan"), True):
        assert w.observe(1, 5, bad, 3) is None
    assert _feed(w, {0: 0.01}, steps=10) == []  # one rank alone: nothing to compare with (W = 1)
    assert len(_feed(w, {0: 0.01, 1: 0.05}, steps=10)) == 1
    w.forget(1)
    assert math.isnan(w.recent(1))
    assert len(_feed(w, {0: 0.01, 1: 0.05}, steps=10)) == 1  # forgotten: a new episode
    w.reset()
    assert math.isnan(w.recent(0)) and len(w.named) == 2  # the record of past episodes stays


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="factor"):
        StragglerWatch(factor=1.0)
    with pytest.raises(ValueError, match="steps"):
        StragglerWatch(steps=0)


class _Sink:
    def __init__(self):
        self.records, self.notices, self.summaries = [], [], []

    def log(self, rec):
        self.records.append(rec)

    def notice(self, msg):
        self.notices.append(msg)

    def summary(self, s):
        self.summaries.append(s)


def test_coordinator_writes_one_event_and_the_summary_list():
    sink = _Sink()
    c = Coordinator(2, writer=sink, heartbeat_timeout=1000, straggler_factor=2.0, straggler_steps=30)
    for r in range(2):
        c.handle({"type": "hello", "rank": r, "host": f"host{r}", "pid": 100 + r, "reports": r == 0})
    for step in range(10, 101, 10):  # timing messages of 10 steps each; rank 1 computes 3x longer
        for r, compute in ((0, 0.01), (1, 0.03)):
            c.handle({"type": "timing", "rank": r, "step": step, "step_s": 0.04, "comm_s": 0.04 - compute,
                      "compute_s": compute, "steps": 10})
    events = [rec for rec in sink.records if rec.get("event") == "straggler"]
    assert len(events) == 1
    assert events[0]["rank"] == 1 and events[0]["host"] == "host1" and events[0]["step"] == 30
    assert events[0]["factor"] == pytest.approx(3.0)
    assert len(sink.notices) == 1 and "straggler: rank 1 on host1" in sink.notices[0]
    c.handle({"type": "summary", "rank": 0, "summary": {"steps": 100}})
    for r in range(2):
        c.handle({"type": "done", "rank": r})
    assert c.finished
    assert sink.summaries[-1]["stragglers"] == [{"rank": 1, "host": "host1", "first_step": 30, "factor": 3.0}]


def test_rank_delay_can_target_one_rank():
    env = {"NDTRAIN_TEST_STEP_DELAY": "1:0.2,3:0.5"}
    assert [_test_faults(r, env)[1] for r in range(4)] == [0.0, 0.2, 0.0, 0.5]
    assert _test_faults(0, {"NDTRAIN_TEST_STEP_DELAY": "0.1"})[1] == 0.1  # every rank, as before
    with pytest.raises(ValueError, match="rank:seconds"):
        _test_faults(0, {"NDTRAIN_TEST_STEP_DELAY": "x:0.1"})


class _Counters:  # what a transport counts (cluster/comm/counters.py): here only blocked seconds matter
    bytes_sent = bytes_received = 0
    blocked_s = 0.0
    estimated = False


def test_ranks_send_compute_time_the_coordinator_names_the_one_the_other_waits_for():
    """Rank 0 spends each step mostly blocked in a collective (marked by WatchedComm's enter/leave on one step, by
    the transport's counters on the other), rank 1 computing: the compute time, not the (equal) step time, names
    rank 1."""
    sink = _Sink()
    coord = Coordinator(2, writer=sink, heartbeat_timeout=1000, straggler_steps=10).start()
    reps = [RankReporter(coord.address, coord.token, r, 2) for r in range(2)]
    counters = _Counters()
    reps[0].watch_counters(counters)
    try:
        for step in range(80):  # ~20 ms a step for both: ~1.6 s, so both send timing messages
            for rep in reps:
                rep.progress(step)
            if step % 2:
                reps[0].enter_comm()
                time.sleep(0.018)
                reps[0].leave_comm()
            else:
                t0 = time.perf_counter()
                time.sleep(0.018)
                counters.blocked_s += time.perf_counter() - t0  # the transport counted it (no WatchedComm mark)
            time.sleep(0.002)
            coord.poll(0)
        deadline = time.monotonic() + 10
        while not sink.records and time.monotonic() < deadline:
            coord.poll(0.05)
    finally:
        for rep in reps:
            rep.close()
        coord.close()
    events = [r for r in sink.records if r.get("event") == "straggler"]
    assert [e["rank"] for e in events] == [1], sink.records
    assert events[0]["compute_s"] > 0.015 and events[0]["median_s"] < 0.010
