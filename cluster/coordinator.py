"""The coordinator: one process beside the ranks (the MPI launcher, or the Ray driver) that they report to.

It listens on 127.0.0.1 (or a given host) for the ranks' RankReporter connections through cluster.coord_server
(each one proves the per-run token by an HMAC challenge-response before anything it sends is parsed; sizes,
connection count and idle time are bounded there). It aggregates each step over ranks (cluster.aggregate) and
hands the records to the sink the launcher gave it (launch: the run directory's metrics.jsonl and summary.json,
TensorBoard events, the console's progress), writes `ranks_file` (each rank's host and pid), and decides when the
job has failed:
  - a rank reported an exception (rank, step, traceback);
  - a rank's connection closed before it said "done" (it crashed);
  - a rank was silent (no message, not even a heartbeat) for heartbeat_timeout seconds;
  - a rank is hung: its peers have waited for it in a collective for stall_timeout seconds WITHOUT PROGRESS
    (heartbeats say whether a rank is blocked in a collective, cluster.rank_entry.WatchedComm, and how many bytes
    its transport has moved): a wait counts only from the last time the waiting rank's byte counters moved, where
    the transport counts bytes as they move (the TCP mesh's ring); where it counts them only when a call returns
    (MPI, shared memory) the limit grows with the bytes in flight over the link bandwidth measured at start-up
    (comm/progress.stall_timeout). The failure names the ranks NOT waiting (docs/network.md, "No false alarms");
  - not every rank connected within start_timeout.
Its server answers every heartbeat with an ack (ranks that stop hearing from it stop themselves:
cluster/metrics_channel.py) and, after `request_stop()` (the driver got Ctrl-C or SIGTERM), tells every rank to stop at a step boundary; ranks then
report "interrupted" at the step they agreed on (cluster/interrupt.py), and `interrupted_step` holds it.
The launcher calls `poll()` in its loop and ends the job when `failure` is set. After a failure, `restart()` opens
a new generation (a new token: messages of the dead group are ignored) that keeps the output files: records of
steps already written (the steps a restarted group replays from its checkpoint) are not written twice.

Each aggregated train record also gets `rank_step_s` {"0": s, "1": s, ...} (each rank's latest measured step time)
and `rank_comm_share` (its share of that time blocked in collectives), from the ranks' timing messages. Their
compute time per step feeds the straggler view (cluster/straggler.py): a rank named there becomes one notice line
and one {"event": "straggler", ...} record; summary.json lists them under "stragglers".

    coord = Coordinator(world_size=2, writer=sinks, ranks_file=out / "ranks.json"); coord.start()
    env = coord.env()                        # NDTRAIN_COORD_ADDR / NDTRAIN_COORD_TOKEN for the ranks
    while not (coord.finished or coord.failure): coord.poll(0.2)
    coord.close()
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ndtrain.data.atomic import atomic_write_text

from .aggregate import StepAggregator, with_rank_timing
from .comm.progress import stall_timeout
from .coord_server import CoordServer, coord_key
from .metrics_channel import ENV_ADDR, ENV_TOKEN
from .straggler import StragglerWatch, straggler_line


@dataclass
class Failure:
    rank: int | None
    step: int | None
    reason: str
    traceback: str = ""
    named: bool = False  # the rank's own one-line message (a run that went bad, a full disk): exit 2, no traceback

    def message(self) -> str:
        if self.named:
            prefix = "" if self.reason.startswith(f"rank {self.rank}") else f"rank {self.rank}: "
            return f"ndtrain: {prefix}{self.reason}"
        who = f"rank {self.rank}" if self.rank is not None else "the job"
        at = f" at step {self.step}" if self.step is not None else ""
        text = f"ndtrain: {who} failed{at}: {self.reason}"
        if self.traceback:
            text += "\n" + "\n".join(f"  [rank {self.rank}] {line}" for line in self.traceback.rstrip().splitlines())
        return text


class Coordinator:
    def __init__(self, world_size: int, writer=None, ranks_file: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, heartbeat_timeout: float = 30.0, start_timeout: float = 120.0,
                 extra_summary: dict | None = None, stall_timeout: float = 20.0,
                 straggler_factor: float = 1.5, straggler_steps: int = 20):
        """writer: the sink of the aggregated records and the summary (a cluster.sink.MetricsSink; it may have
        notice(message)); ranks_file: where to write each rank's host and pid once all have connected."""
        self.world_size = int(world_size)
        self.members: set[int] = set(range(self.world_size))  # the group's ranks (an elastic run's change: membership.py)
        self.writer = writer
        self.ranks_file = Path(ranks_file) if ranks_file is not None else None
        self.host, self.port = host, port
        self.token = token or secrets.token_hex(16)
        self._key = coord_key(self.token)
        self.heartbeat_timeout, self.start_timeout = heartbeat_timeout, start_timeout
        self.stall_timeout = stall_timeout
        self.generation = 0
        self._written: dict[str, int] = {}  # kind ("train"/"eval") -> highest step written to the files
        self.replayed = 0  # records of a restarted group not written again
        self.extra_summary = dict(extra_summary or {})
        self.failure: Failure | None = None
        self.finished = False
        self.ranks: dict[int, dict] = {}  # rank -> {"host", "pid"}
        self.last_seen: dict[int, float] = {}
        self.last_step: dict[int, int] = {}
        self.liveness: dict[int, tuple[float, float | None]] = {}  # rank -> (when heard, comm_wait_s then or None)
        self.progress: dict[int, dict] = {}  # rank -> bytes moved, when they last changed, in flight, link bytes/s
        self.rank_timing: dict[int, dict] = {}  # rank -> {"step", "step_s", "comm_s"} (latest timing message)
        self.training: set[int] = set()  # ranks past set-up (their loop has started a step)
        self.done: set[int] = set()
        self.records: list[dict] = []  # aggregated, in write order
        self._summary: dict | None = None
        self._pending_logs: list[dict] = []  # logs that arrived before every rank said hello
        self._agg: StepAggregator | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._t0 = time.monotonic()
        self._t_wall0 = time.time()
        self._server: CoordServer | None = None
        self.stop_requested = False
        self.interrupted_at: dict[int, int] = {}  # rank -> the step it stopped at on request
        self.stragglers = StragglerWatch(straggler_factor, straggler_steps)

    # -- server ------------------------------------------------------------------------------------------------------
    def start(self) -> "Coordinator":
        # an authenticated rank's link may stay silent up to heartbeat_timeout before the heartbeat rule names it;
        # the server closes it only well after that
        self._server = CoordServer(self.host, self.port, credentials=lambda: (self._key, self.generation),
                                   deliver=self._inbox.put, world_size=self.world_size,
                                   idle_s=max(120.0, 4 * self.heartbeat_timeout))
        self.port = self._server.start()
        self._t0 = time.monotonic()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server_stats(self) -> dict:
        """Connections accepted, authenticated, refused, malformed, timed out, evicted, busy (cluster.coord_server)."""
        return dict(self._server.stats) if self._server is not None else {}

    def env(self) -> dict[str, str]:
        return {ENV_ADDR: self.address, ENV_TOKEN: self.token}

    def request_stop(self) -> None:
        """Ask every rank to stop at the next step boundary with a checkpoint (the server tells each connected rank,
        and any that connects later)."""
        self.stop_requested = True
        if self._server is not None:
            self._server.stop = True

    @property
    def interrupted_step(self) -> int | None:
        """The step every rank stopped at on request (None: the job was not interrupted)."""
        steps = set(self.interrupted_at.values())
        return steps.pop() if len(steps) == 1 and self.members <= set(self.interrupted_at) else None

    # -- main loop ---------------------------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.2) -> None:
        """Handle what arrived within `timeout` seconds, then check the deadlines."""
        deadline = time.monotonic() + timeout
        while self.failure is None and not self.finished:
            left = deadline - time.monotonic()
            try:
                msg = self._inbox.get(timeout=max(0.0, left)) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            self.handle(msg)
        self._check_deadlines()

    def handle(self, msg: dict) -> None:
        if msg.get("_gen", self.generation) != self.generation:
            return  # from a group that was torn down (a restart)
        kind, rank = msg.get("type"), msg.get("rank")
        now = time.monotonic()
        if rank is not None:
            self.last_seen[rank] = now
            if "step" in msg and msg["step"] is not None:
                self.last_step[rank] = int(msg["step"])
            if "comm_wait_s" in msg:
                self.liveness[rank] = (now, msg["comm_wait_s"])
            if "comm_bytes" in msg:
                self._note_progress(rank, msg, now)
            if msg.get("training"):
                self.training.add(rank)
        if kind == "timing":
            self.rank_timing[rank] = {k: msg.get(k) for k in ("step", "step_s", "comm_s")}
            self._straggler(self.stragglers.observe(rank, msg.get("step"), msg.get("compute_s"), msg.get("steps"),
                                                    host=self.ranks.get(rank, {}).get("host")))
            return
        if kind == "hello":
            self.ranks[rank] = {"rank": rank, "host": msg.get("host"), "pid": msg.get("pid"),
                                "reports": bool(msg.get("reports", True))}
            if self._agg is None and self.members <= set(self.ranks):
                self._all_connected()
        elif kind == "log":
            rec = msg["record"]
            self.last_step[rank] = int(rec.get("step", 0))
            if "error" in rec:  # the worker loop logs its exception before it re-raises
                self._fail(rank, rec.get("step"), str(rec["error"]), str(rec.get("traceback", "")))
                return
            if not self.ranks.get(rank, {}).get("reports", True):
                if "eval" not in rec and isinstance(rec.get("step_time"), (int, float)):
                    # a non-reporting rank's own timing (if the loop logs it on every rank): exact, per step
                    self.rank_timing[rank] = {"step": rec["step"], "step_s": rec["step_time"],
                                              "comm_s": rec.get("comm_time")}
                return
            if self._agg is None:
                self._pending_logs.append(msg)
            else:
                self._emit(self._agg.add(rank, msg["record"]))
        elif kind == "notice":
            notice = getattr(self.writer, "notice", None)
            if notice is not None and isinstance(msg.get("message"), str):
                notice(msg["message"])
        elif kind == "summary":
            if self._summary is None or rank == 0:
                self._summary = msg["summary"]
        elif kind == "error":
            if isinstance(msg.get("message"), str):
                self._fail(rank, msg.get("step"), msg["message"][:4000], named=True)
            else:
                self._fail(rank, msg.get("step"), "raised an exception", msg.get("traceback", ""))
        elif kind == "interrupted":
            self.interrupted_at[rank] = int(msg["step"])
            if self.members <= set(self.interrupted_at) and len(set(self.interrupted_at.values())) > 1:
                self._fail(rank, None, f"ranks stopped at different steps on request: {self.interrupted_at}")
                return
            self.done.add(rank)
            if self.members <= self.done:
                self._finish()
        elif kind == "done":
            self.done.add(rank)
            if self.members <= self.done:
                self._finish()
        elif kind == "eof":
            if rank not in self.done and self.failure is None:
                self._fail(rank, self.last_step.get(rank), "its process ended without reporting "
                           "(killed, or exited before the job finished)")

    def _check_deadlines(self) -> None:
        if self.failure is not None or self.finished:
            return
        now = time.monotonic()
        if not self.members <= set(self.ranks):
            if now - self._t0 > self.start_timeout:
                missing = sorted(self.members - set(self.ranks))
                self._fail(missing[0] if missing else None, None,
                           f"ranks {missing} did not connect within {self.start_timeout:.0f} s")
            return
        for r in sorted(self.members):
            if r in self.done:
                continue
            silent = now - self.last_seen.get(r, self._t0)
            if silent > self.heartbeat_timeout:
                self._fail(r, self.last_step.get(r), f"silent for {silent:.0f} s (no heartbeat; "
                           f"timeout {self.heartbeat_timeout:.0f} s)")
                return
        self._check_stall(now)

    def comm_waits(self, now: float | None = None) -> dict[int, float]:
        """rank -> seconds it has been blocked in a collective (ranks that are not blocked are absent)."""
        now = time.monotonic() if now is None else now
        return {r: wait + (now - heard) for r, (heard, wait) in self.liveness.items()
                if wait is not None and r not in self.done}

    def _note_progress(self, rank: int, msg: dict, now: float) -> None:
        """Remember when this rank's byte counters last moved (and what is in flight, at what link bandwidth)."""
        moved = int(msg["comm_bytes"])
        prev = self.progress.get(rank)
        changed = now if prev is None or prev["bytes"] != moved else prev["changed"]
        self.progress[rank] = {"bytes": moved, "changed": changed, "counted": bool(msg.get("comm_counted")),
                               "inflight": int(msg.get("inflight_bytes") or 0), "bps": msg.get("link_bps")}

    def stall_waits(self, now: float, limit: float) -> dict[int, tuple[float, float]]:
        """rank -> (seconds blocked WITHOUT progress, its limit). Bytes counted as they move: the wait counts from
        the last change of the rank's counters. Bytes counted only at the end of a call (MPI): the limit is
        stall_timeout(bytes in flight, measured bandwidth) with the configured limit as its floor."""
        out = {}
        for r, wait in self.comm_waits(now).items():
            p, lim = self.progress.get(r), limit
            if p is not None:
                if p["counted"]:
                    wait = min(wait, now - p["changed"])
                elif p["inflight"] and p["bps"]:
                    lim = stall_timeout(p["inflight"], float(p["bps"]), floor_s=limit)
            out[r] = (wait, lim)
        return out

    def _check_stall(self, now: float) -> None:
        """A rank that never enters the collective its peers wait in is hung (its heartbeat thread may live on)."""
        if not self.stall_timeout:
            return
        # set-up (loading data, building the model) may keep a rank from the first collective much longer
        limit = self.stall_timeout if self.members <= self.training else \
            max(self.stall_timeout, self.start_timeout)
        judged = self.stall_waits(now, limit)
        if not any(w > lim for w, lim in judged.values()):
            return
        waits = {r: w for r, (w, _) in judged.items()}
        limit = max(lim for w, lim in judged.values() if w > lim)
        waiting = sorted(r for r, (w, lim) in judged.items() if w > lim)
        longest = max(waits.values())
        stuck = sorted(self.members - set(waits) - self.done)
        if stuck:
            r = stuck[0]
            others = f" (and ranks {stuck[1:]})" if len(stuck) > 1 else ""
            self._fail(r, self.last_step.get(r), f"hung{others}: ranks {waiting} have waited for it in a collective "
                       f"for {longest:.0f} s (stall timeout {limit:.0f} s)")
        else:  # every rank is blocked: name the one furthest behind
            r = min(waits, key=lambda q: (self.last_step.get(q, -1), q))
            self._fail(r, self.last_step.get(r), f"every rank has been blocked in a collective for up to "
                       f"{longest:.0f} s (stall timeout {limit:.0f} s); rank {r} is furthest behind")

    def fail(self, rank: int | None, step: int | None, reason: str, traceback: str = "") -> None:
        """For the launcher: a failure it saw itself (mpiexec exited, a Ray actor died)."""
        self._fail(rank, step, reason, traceback)

    def _straggler(self, event: dict | None) -> None:
        """A rank just named a straggler: one line on the progress output, one event record in metrics.jsonl."""
        if event is None or self.writer is None:
            return
        notice = getattr(self.writer, "notice", None)
        if notice is not None:
            notice(straggler_line(event, self.stragglers.steps))
        self.writer.log(event)

    def _fail(self, rank, step, reason, traceback="", named: bool = False) -> None:
        if self.failure is None:
            self.failure = Failure(rank, step, reason, traceback, named)

    # -- outputs -----------------------------------------------------------------------------------------------------
    def _all_connected(self) -> None:
        reporting = sorted(r for r, info in self.ranks.items() if info["reports"])
        self._agg = StepAggregator(reporting or [0])
        if self.ranks_file is not None:
            self.ranks_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.ranks_file, json.dumps([{k: v for k, v in self.ranks[r].items() if k != "reports"}
                                                          for r in sorted(self.ranks)], indent=2) + "\n")
        pending, self._pending_logs = self._pending_logs, []
        for msg in pending:
            self._emit(self._agg.add(msg["rank"], msg["record"]))

    def _emit(self, records: list[dict]) -> None:
        for rec in records:
            kind = "eval" if "eval" in rec else "train"
            step = int(rec["step"])
            if step <= self._written.get(kind, -1) and self.generation > 0:
                self.replayed += 1  # a restarted group replaying steps after its checkpoint: written already
                continue
            self._written[kind] = max(step, self._written.get(kind, -1))
            if kind == "train":
                with_rank_timing(rec, self.rank_timing, self.world_size)
            self.records.append(rec)
            if self.writer is not None:
                self.writer.log(rec)

    def restart(self) -> None:
        """A new generation for a restarted rank group: a new token (connections of the old group are ignored,
        and cannot reconnect), fresh per-rank state; output files, records and the progress bar stay."""
        self.generation += 1
        self.token = secrets.token_hex(16)
        self._key = coord_key(self.token)
        self.failure = None
        self.finished = False
        self.ranks, self.last_seen, self.last_step, self.liveness, self.rank_timing = {}, {}, {}, {}, {}
        self.progress = {}
        self.members = set(range(self.world_size))
        self.training = set()
        self.done = set()
        self.interrupted_at = {}
        self.stragglers.reset()
        self._summary = None
        self._pending_logs = []
        self._agg = None
        self._t0 = time.monotonic()

    def _finish(self) -> None:
        if self._agg is not None:
            self._emit(self._agg.flush_all())
        self.finished = True
        if self._summary is not None and self.writer is not None:
            summary = dict(self._summary)
            for k, v in self._agg_summary().items():
                summary.setdefault(k, v)
            self.writer.summary(summary)

    def _agg_summary(self) -> dict:
        train = [r for r in self.records if "eval" not in r]
        out = {"world_size": self.world_size, "coordinator_wall_s": time.time() - self._t_wall0}
        for key in ("tokens_per_s", "samples_per_s", "comm_share", "step_time", "comm_sent_bytes", "comm_blocked_s"):
            vals = [r[key] for r in train if isinstance(r.get(key), (int, float))]
            if vals:
                out[f"mean_{key}"] = sum(vals) / len(vals)
        if self.world_size > 1:
            out["stragglers"] = list(self.stragglers.named)
        out.update(self.extra_summary)
        return out

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()
