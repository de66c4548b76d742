"""In-process ranks for worker-loop tests: W threads whose collectives meet at a barrier and sum in rank order
(deterministic), so multi-rank behaviour is tested without launching processes."""
from __future__ import annotations

import threading

from ndtrain.cluster.comm.base import Communicator


class ThreadGroup:
    """World of W in-process ranks."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world


class ThreadComm(Communicator):
    def __init__(self, group: ThreadGroup, rank: int):
        self.g, self.rank, self.world_size = group, rank, group.world

    def _exchange(self, item):
        self.g.slots[self.rank] = item
        self.g.barrier.wait()
        items = list(self.g.slots)
        try:
            self.g.barrier.wait()  # nobody overwrites a slot before every rank has read them
        except threading.BrokenBarrierError:
            # A peer failed right after this exchange (e.g. on the config check) and aborted the barrier while we
            # were still waking up: our exchange had completed, so go on and fail on our own terms.
            pass
        return items

    def allreduce(self, buf):
        items = self._exchange(buf.copy())
        total = items[0].copy()
        for x in items[1:]:
            total += x
        buf[...] = total

    def broadcast(self, buf, root=0):
        buf[...] = self._exchange(buf.copy())[root]

    def barrier(self):
        self.g.barrier.wait()

    def allgather_obj(self, obj):
        return self._exchange(obj)


def run_threads(cfgs):
    """run_worker on len(cfgs) thread-ranks; returns (summaries, errors) by rank."""
    from ndtrain.launch.worker import run_worker
    from ndtrain.cluster.sink import NullSink
    group = ThreadGroup(len(cfgs))
    out, errs = [None] * len(cfgs), [None] * len(cfgs)

    def target(r):
        try:
            out[r] = run_worker(cfgs[r], ThreadComm(group, r), None if r == 0 else NullSink())
        except BaseException as e:  # collected and asserted on by the test
            errs[r] = e
            group.barrier.abort()

    ts = [threading.Thread(target=target, args=(r,)) for r in range(len(cfgs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out, errs
