"""The rank side of elastic training (docs/elastic.md): leave a broken group, join the next one, and continue from
the most advanced survivor's in-memory state.

    m = Membership(joining=False)                    # the Ray actor holds it; the driver's calls reach it by thread
    Trainer(job, comm, sink, membership=m)           # the loop calls regroup(trainer, reason) when the group broke
                                                     # (GroupBroken out of a collective) or every rank voted for it

The driver (launch/elastic.py) is the rendezvous: it wakes ranks blocked on a dead peer (abort_group), collects the
survivors (and a joining rank) once each waits in `wait_group`, connects them into a new group (shared memory on one
node, the TCP mesh across nodes) and hands each its new rank through `release`. Then, on the new group:

  1. every rank sends a small record (steps done, loader position after them, counters, fingerprints);
  2. the rank with the most steps done (the lowest such rank) is the root: its parameters, module buffers and
     optimizer state are broadcast, its counters and loader position taken by every rank. A rank that applied the
     step in flight and one that did not end identical; in synchronous data parallelism that state is what an
     undisturbed run holds after those steps (every rank applies the same summed gradient);
  3. each rank rebuilds its loader for its new rank and W at that position (job.reshard): the global batches and
     their order do not depend on W, so no row is skipped or repeated.
At most the step in flight is redone. RNG streams: deterministic mode seeds dropout per (seed, step, micro-batch),
so nothing rank-specific is carried; otherwise a rank keeps its own stream and a joining rank starts a fresh one.
"""
from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np

from ndtrain.cluster.nonfinite import WorkerError

ENV_TEST_DIE_REGROUP = "NDTRAIN_TEST_DIE_REGROUP"  # test-only: "member": that member is SIGKILLed inside a regroup


class GroupBroken(ConnectionError):
    """A collective failed because the group is broken (a peer died, or the driver aborted the group to regroup)."""


class BelowMinimum(WorkerError):
    """Fewer ranks than cluster.min_workers are left; raised after a checkpoint (one line, exit 2)."""


class Membership:
    """Shared between the actor's control calls (driver threads) and the training thread."""

    def __init__(self, joining: bool = False, member: int = 0):
        self.joining, self.member = joining, member
        self._pending = threading.Event()
        self._released: queue.Queue = queue.Queue()
        self.waiting = False
        self.wrap = lambda comm: comm  # rank_entry: the reporter's WatchedComm around a new communicator
        self.reporter = None  # the rank's RankReporter (events to the coordinator), when it has one
        self.resumed_step = None  # after a regroup: the step the group resumed at (until the next step is done)

    # -- the driver's calls (another thread of the actor) -------------------------------------------------------------
    def request(self) -> None:
        """A membership change is pending: vote for it at the next step (every rank leaves after the same step)."""
        self._pending.set()

    def release(self, comm, info: dict) -> None:
        """The new group is formed: `comm` is this rank's communicator in it; info {"below_min": bool, ...}."""
        self._released.put((comm, dict(info)))

    # -- the training thread -------------------------------------------------------------------------------------------
    def vote(self) -> float:
        return 1.0 if self._pending.is_set() else 0.0

    def wait_group(self, lost=lambda: False, poll_s: float = 0.5):
        """Block until the driver releases the new group; (comm, info). lost(): the coordinator is gone (a rank
        then stops: no driver will ever release it)."""
        self.waiting = True
        try:
            while True:
                try:
                    comm, info = self._released.get(timeout=poll_s)
                    break
                except queue.Empty:
                    if lost():
                        raise WorkerError(f"member {self.member}: lost the coordinator while waiting for the new "
                                          f"group") from None
        finally:
            self.waiting = False
        self._pending.clear()
        return self.wrap(comm), info  # a joiner stays `joining` until it has the state (regroup)

    def event(self, phase: str, step: int) -> None:
        """Tell the coordinator (launch/elastic.py) the new group resumed at `step` / completed it."""
        if self.reporter is not None and hasattr(self.reporter, "event"):
            self.reporter.event({"type": "membership", "phase": phase, "step": int(step)})


# -- the state transfer ------------------------------------------------------------------------------------------------
def state_arrays(job) -> dict[str, np.ndarray]:
    """name -> array of everything a rank holds alike and a joiner must receive: parameters, module buffers,
    optimizer state (copies for the optimizer: load them back with load_optimizer)."""
    out = {"param": job.store.data}
    for name, buf in job.model.module.named_buffers():
        out[f"buffer/{name}"] = buf
    if hasattr(job.optimizer, "state_dict"):
        for k, v in job.optimizer.state_dict().items():
            if isinstance(v, np.ndarray) and v.ndim > 0:
                out[f"optim/{k}"] = v
    return out


def transfer_state(job, comm, mine: dict) -> dict:
    """Every rank of the new group calls it with its record {"step": steps done (-1: joining), "loader",
    "skipped_steps", "nonfinite_in_row", "wall_time", "optim_step", "fingerprints"}. The rank with the most steps
    done (lowest rank among equals) is the root: its arrays are broadcast in place into every rank's job. Returns
    {"root": rank, **root's record}. WorkerError when a rank's fingerprints (config, data) differ from the root's."""
    records = comm.allgather_obj(mine)
    root = max(range(len(records)), key=lambda r: (records[r]["step"], -r))
    want = records[root]
    if want["step"] < 0:
        raise WorkerError("elastic regroup: no rank of the new group holds any training state")
    for r, rec in enumerate(records):
        if rec.get("fingerprints") != want.get("fingerprints"):
            raise WorkerError(f"rank {r}: config or data {rec.get('fingerprints')} differ from rank {root}'s "
                              f"{want.get('fingerprints')}")
    arrays = state_arrays(job)
    # A rank whose own state is older than the root's receives into copies and takes them only once every array has
    # arrived: if the group breaks mid-transfer (another rank lost), its state is still that of its own step count,
    # so the next regroup can choose its root from honest records. A joiner (nothing to keep) and a rank at the
    # root's step (the same bits) receive in place.
    staged = 0 <= mine["step"] < want["step"] and comm.rank != root
    into = {k: np.empty_like(v) for k, v in arrays.items()} if staged else arrays
    for name in sorted(arrays):
        comm.broadcast(into[name], root)  # in place (parameters and buffers are the job's own arrays)
    if staged:
        for k, v in into.items():
            np.copyto(arrays[k], v)
    optim = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    if optim:
        optim["step"] = np.array(int(want["optim_step"]), dtype=np.int64)
        job.optimizer.load_state_dict(optim)
    return {"root": root, **want}


def _test_die_here(member: int) -> bool:
    spec = os.environ.get(ENV_TEST_DIE_REGROUP, "").strip()
    return spec.isdigit() and int(spec) == member


def my_record(trainer) -> dict:
    """This rank's record for transfer_state (joining: step -1)."""
    job = trainer.job
    opt = job.optimizer.state_dict() if hasattr(job.optimizer, "state_dict") else {}
    joining = trainer.membership is not None and trainer.membership.joining
    return {"step": -1 if joining else int(trainer.step), "loader": trainer.done_loader,
            "skipped_steps": int(trainer.skipped_steps), "nonfinite_in_row": int(trainer._nonfinite_in_row),
            "wall_time": float(trainer.wall_time()), "optim_step": int(opt.get("step", 0)),
            "fingerprints": {**job.fingerprints, "param_count": int(job.store.size)}}


def regroup(trainer, reason: str) -> bool:
    """Leave the broken (or voted-away) group, wait for the next, take the root's state, re-slice the data. Sets
    trainer.comm / rank / world / step / counters and the loader. Returns True (the loop goes on); raises
    BelowMinimum after a checkpoint when the driver says fewer than cluster.min_workers ranks are left."""
    m = trainer.membership
    rep = getattr(m, "reporter", None)
    while True:
        try:
            trainer.comm.close()
        except Exception:
            pass  # a broken transport may fail to close; its resources go with the group
        comm, info = m.wait_group(lost=lambda: bool(getattr(rep, "lost", False)))
        trainer.comm, trainer.rank, trainer.world = comm, comm.rank, comm.world_size
        if _test_die_here(m.member):
            os.kill(os.getpid(), 9)  # test-only: this member dies inside a regroup (NDTRAIN_TEST_DIE_REGROUP)
        try:
            root = transfer_state(trainer.job, comm, my_record(trainer))
            break
        except GroupBroken:  # a rank of the new group was lost during the transfer: wait for the next group
            continue
    m.joining = False
    trainer.step, trainer.skipped_steps = int(root["step"]), int(root["skipped_steps"])
    trainer._nonfinite_in_row = int(root["nonfinite_in_row"])
    trainer.job.wall_before = float(root["wall_time"]) - (time.perf_counter() - trainer._t_start)
    trainer.job.reshard(trainer.rank, trainer.world)  # launch: this rank's loader (and eval share) for the new W
    trainer.job.loader.load_state_dict(root["loader"])
    trainer.done_loader = trainer.job.loader.state_dict()
    trainer.reset_after_regroup()
    if info.get("below_min"):
        trainer.save_checkpoint()
        raise BelowMinimum(f"only {trainer.world} worker(s) left, below cluster.min_workers ({info['min_workers']}); "
                           f"checkpoint written at step {trainer.step}: continue with --resume on any number of "
                           f"workers ({info.get('left') or reason})")
    if trainer.rank == 0:
        m.resumed_step = trainer.step
        m.event("resumed", trainer.step)
    return True
