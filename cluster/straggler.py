"""The live straggler view: which rank the others have been waiting for (pure; the coordinator feeds it).

In synchronous data parallelism every rank's wall time per step is the same: the fast ranks wait for the slow one
inside the step's all-reduces. So the signal is each rank's own COMPUTE time per step: its step time minus the time
it was blocked in communication (the larger of what rank_entry.WatchedComm measured around blocking calls and what
the transport counted in comm/counters.py: on shared memory the reduce inside an all-reduce's launch blocks too).
The slow rank computes longer and waits little; the others compute less and wait for it. Each rank sends, in its
"timing" message (cluster/metrics_channel.py, about once a second), the median of its per-step compute seconds
since its last message and how many steps that covers.

A rank is named when its compute time has been more than `factor` x the reference for `steps` consecutive steps.
The reference is the median over the OTHER ranks of their recent compute time (leaving the rank out keeps it from
pulling its own reference up: with two ranks, the reference is the other rank). A message counts all its steps as
slow (or not) by its median, so one long step in it (a checkpoint, a garbage collection) does not make a rank a
straggler, and a message whose median is slow counts all its steps. A difference below `floor_s` never counts
(microsecond-sized steps differ by noise). Named once per episode: again only after the rank recovered (a message
below the threshold) and fell behind again.

    watch = StragglerWatch(factor=1.5, steps=20)
    event = watch.observe(rank=1, step=140, compute_s=0.031, steps=12)   # None, or
    # {"event": "straggler", "rank": 1, "step": 140, "compute_s": 0.031, "median_s": 0.012, "factor": 2.58}
    watch.named        # [{"rank", "host", "first_step", "factor"}, ...] for summary.json "stragglers"
"""
from __future__ import annotations

import math
from collections import deque

FLOOR_S = 0.002  # compute differences smaller than this are noise, not a straggler


def weighted_median(samples) -> float:
    """Median of values each repeated `count` times: samples [(value, count)] (count >= 1)."""
    items = sorted((v, c) for v, c in samples if c > 0)
    total = sum(c for _, c in items)
    if not total:
        return math.nan
    half, seen = total / 2.0, 0
    for i, (v, c) in enumerate(items):
        seen += c
        if seen > half:
            return v
        if seen == half:  # an even split: the mean of the two middle values
            return (v + items[i + 1][0]) / 2.0
    return items[-1][0]


def median(values: list[float]) -> float:
    return weighted_median([(v, 1) for v in values])


class StragglerWatch:
    def __init__(self, factor: float = 1.5, steps: int = 20, floor_s: float = FLOOR_S):
        if not factor > 1.0:
            raise ValueError(f"straggler factor must be > 1, got {factor}")
        if steps < 1:
            raise ValueError(f"straggler steps must be >= 1, got {steps}")
        self.factor, self.steps, self.floor_s = float(factor), int(steps), float(floor_s)
        self._window: dict[int, deque] = {}  # rank -> recent (compute_s, steps), about `steps` steps' worth
        self._run: dict[int, int] = {}  # rank -> consecutive slow steps
        self._flagged: set[int] = set()  # ranks in a straggler episode now
        self.named: list[dict] = []  # every episode: {"rank", "host", "first_step", "factor"}

    def recent(self, rank: int) -> float:
        """The rank's median compute seconds per step over about the last `steps` steps (NaN: none yet)."""
        return weighted_median(self._window.get(rank, ()))

    def observe(self, rank: int, step, compute_s, steps=1, host: str | None = None) -> dict | None:
        """One timing message of `rank`: the median compute seconds `compute_s` of `steps` steps ending at `step`.
        Returns the straggler event when this message starts an episode, else None."""
        if not isinstance(compute_s, (int, float)) or isinstance(compute_s, bool) or not math.isfinite(compute_s):
            return None
        n = max(1, int(steps or 1))
        win = self._window.setdefault(rank, deque())
        win.append((float(compute_s), n))
        while sum(c for _, c in win) - win[0][1] >= self.steps:  # keep just enough messages to cover `steps`
            win.popleft()
        others = [self.recent(r) for r in self._window if r != rank]
        others = [v for v in others if math.isfinite(v)]
        if not others:
            return None
        ref = median(others)
        if compute_s > self.factor * ref and compute_s - ref > self.floor_s:
            self._run[rank] = self._run.get(rank, 0) + n
        else:
            self._run[rank] = 0
            self._flagged.discard(rank)  # recovered: a later episode is named again
            return None
        if self._run[rank] < self.steps or rank in self._flagged:
            return None
        self._flagged.add(rank)
        mine = self.recent(rank)
        ratio = mine / ref if ref > 0 else math.inf
        self.named.append({"rank": rank, "host": host, "first_step": int(step), "factor": round(ratio, 3)})
        return {"event": "straggler", "rank": rank, "host": host, "step": int(step), "compute_s": mine,
                "median_s": ref, "factor": ratio}

    def forget(self, rank: int) -> None:
        """The rank left the group (a membership change, a restart): its timings no longer count."""
        for d in (self._window, self._run):
            d.pop(rank, None)
        self._flagged.discard(rank)

    def reset(self) -> None:
        """A new rank group (rank numbers may mean other processes): forget every timing; `named` stays."""
        self._window.clear()
        self._run.clear()
        self._flagged.clear()


def straggler_line(event: dict, steps: int) -> str:
    """The progress output's line for a straggler event (steps: the watch's n)."""
    return (f"straggler: rank {event['rank']} on {event.get('host') or '?'} computes {event['compute_s'] * 1e3:.1f} ms "
            f"per step, {event['factor']:.1f}x the other ranks' median ({event['median_s'] * 1e3:.1f} ms), for "
            f"{steps}+ steps up to step {event['step']}; the others wait for it in every all-reduce")
