"""The coordinator of an elastic Ray run (docs/elastic.md): ranks that leave are membership changes, not failures.

    coord = ElasticCoordinator(workers, max_workers, writer=..., ...).start()
    lost = coord.take_lost()               # [(member, reason)]: dead (link closed, Ray actor died), silent or hung
    coord.retire(member); coord.regroup(members_in_rank_order)
    coord.begin_change("shrink", member, host, reason, previous_world_size, t_detect)

Every rank keeps its coordinator link for its whole life under a fixed *member* id (the rank it started as; a rank
that joins takes the lowest free id below max_workers), whatever its rank in the current group. A failure the base
coordinator would end the job for (a closed link, silence, a hang, the Ray actor's death) names a member: here it
is queued for the launcher (launch/elastic.py), which shrinks the group; a rank that raised (a traceback, or a one-line
reason such as fewer ranks than cluster.min_workers) still ends the job.

Each change becomes one record in metrics.jsonl (through the run directory's writer) and one line on stderr:
    {"event": "membership", "step": <step the new group resumes at>, "change": "shrink" | "grow",
     "world_size": <new W>, "previous_world_size": <old W>, "rank": <member that left or joined>, "host": <its host>,
     "reason": <text>, "recovery_s": <detection (shrink) or capacity seen (grow) -> the group's next completed step
     (shrink) or the joined group resuming (grow)>}
summary.json counts them: "membership_changes".
"""
from __future__ import annotations

import sys
import time

from .aggregate import StepAggregator
from .coordinator import Coordinator


class ElasticCoordinator(Coordinator):
    def __init__(self, world_size: int, max_workers: int, **kw):
        super().__init__(world_size, **kw)
        self.slots = int(max_workers)  # member ids are 0 .. max_workers - 1
        self.lost: list[tuple[int, str]] = []
        self._leaving: set[int] = set()
        self.pending_change: dict | None = None
        self.extra_summary.setdefault("membership_changes", 0)

    def start(self) -> "ElasticCoordinator":
        world, self.world_size = self.world_size, self.slots  # the server admits any member id below max_workers
        try:
            super().start()
        finally:
            self.world_size = world
        return self

    # -- failures that are membership changes -------------------------------------------------------------------------
    def _fail(self, rank, step, reason, traceback="", named: bool = False) -> None:
        if rank in self._leaving and not traceback and not named:
            return  # lost already (its link's eof and its actor's death both report it)
        if rank in self.members and not traceback and not named and "interrupted" not in reason \
                and self.failure is None and rank not in self.done:
            if rank not in self._leaving:
                self._leaving.add(rank)
                self.lost.append((rank, f"{reason}" + (f" (at step {step})" if step is not None else "")))
            return
        super()._fail(rank, step, reason, traceback, named)

    def take_lost(self) -> list[tuple[int, str]]:
        out, self.lost = self.lost, []
        return out

    def retire(self, member: int) -> None:
        """Forget a member that left (its link may still deliver an eof: ignored)."""
        self.members.discard(member)
        if member in self.ranks:
            self.ranks[member]["reports"] = False  # records still in flight from it are not the job's
        for table in (self.liveness, self.progress, self.rank_timing):
            table.pop(member, None)
        self.training.discard(member)

    def admit(self, member: int) -> None:
        """A joining member, before it says hello: a fresh slate, not yet a member of the group."""
        self._leaving.discard(member)
        self.done.discard(member)
        for table in (self.ranks, self.last_seen, self.last_step, self.liveness, self.progress, self.rank_timing):
            table.pop(member, None)
        self.training.discard(member)

    def regroup(self, order: list[int]) -> None:
        """The new group: order[r] is the member with rank r. Rank 0's records are the job's from now on."""
        self.members = set(order)
        self.world_size = len(order)
        now = time.monotonic()
        for m in order:
            self.last_seen.setdefault(m, now)
            if m in self.ranks:
                self.ranks[m]["reports"] = m == order[0]
        self._agg = StepAggregator([order[0]])

    # -- events ------------------------------------------------------------------------------------------------------
    def begin_change(self, change: str, member: int, host: str, reason: str, previous: int, t0: float) -> None:
        """A change whose record is written once the new group resumed (grow) or completed a step (shrink). A shrink
        while another change was still pending (a rank lost during a regroup) is one event with the first one: from
        the world that last trained, naming the first rank lost (the later one in its reason), timed from the first
        detection."""
        was = self.pending_change
        if was is not None and change == "shrink":
            previous, t0 = was["previous_world_size"], was["_t0"]
            if was["change"] == "shrink":
                reason = f"{was['reason']}; then rank {member} on {host} during the regroup: {reason}"
                member, host = was["rank"], was["host"]
            else:
                reason = f"{reason} (while rank {was['rank']} was joining: cancelled)"
        self.pending_change = {"event": "membership", "step": None, "change": change, "world_size": self.world_size,
                               "previous_world_size": previous, "rank": member, "host": host, "reason": reason,
                               "_t0": t0}

    def handle(self, msg: dict) -> None:
        if msg.get("type") == "membership" and msg.get("_gen", self.generation) == self.generation:
            ev = self.pending_change
            if ev is None:
                return
            if msg.get("phase") == "resumed":
                ev["step"] = int(msg.get("step", 0))
            if (msg.get("phase") == "stepped") == (ev["change"] == "shrink") and ev["step"] is not None:
                self._record_change(ev)
            return
        super().handle(msg)

    def _record_change(self, ev: dict) -> None:
        self.pending_change = None
        rec = {k: v for k, v in ev.items() if not k.startswith("_")}
        rec["recovery_s"] = round(time.monotonic() - ev["_t0"], 3)
        self.extra_summary["membership_changes"] = self.extra_summary.get("membership_changes", 0) + 1
        self.changes.append(rec)
        for part in getattr(self.writer, "parts", [self.writer]):
            if part is not None and hasattr(part, "dir"):  # the run directory's metrics.jsonl (not the console, TB)
                part.log(rec)
        verb = "left" if rec["change"] == "shrink" else "joined"
        print(f"ndtrain: rank {rec['rank']} on {rec['host']} {verb} ({rec['reason']}): {rec['previous_world_size']} "
              f"-> {rec['world_size']} workers, resumed at step {rec['step']} after {rec['recovery_s']:.1f} s",
              file=sys.stderr, flush=True)

    @property
    def changes(self) -> list[dict]:
        if not hasattr(self, "_changes"):
            self._changes = []
        return self._changes
