"""Bucketed gradient all-reduce that overlaps the backward pass (PyTorch DDP's Reducer, on one flat buffer).

The flat gradient buffer is cut into buckets of ~bucket_mb along parameter boundaries, in REVERSE registration
order: backward produces the last layers' gradients first, so the first bucket is ready early. A bucket is launched
(comm.iallreduce on its contiguous slice of store.grad) as soon as backward has finished every parameter in it, and
communication runs while backward computes the earlier layers.

How "finished" is known without touching any layer: engine.module._HOOKS sees every module call. "forward" events
count how many times each parameter-owning module ran in this micro-batch; each "backward" event decrements that
count, and a module's parameters are final when its count reaches zero (a module used twice, e.g. tied weights or
an RNN cell over time, is done only after its last backward). A Param registered in several modules (tying) is
final when all of them are done. Requirement on models: a module writes only the grads of Params it registered.

Buckets are launched strictly in bucket order (bucket k only after 0..k-1), so every rank issues the same
collectives in the same order even if its backward order differed: MPI needs that to be correct and not hang.

    reducer.begin(sync=True)    # before forward of a micro-batch (sync=False: accumulate, no communication)
    loss, backward = ...; backward(...)
    reducer.finish()            # launches what remains, waits for all: store.grad holds the SUM over ranks
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ndtrain.engine import module as engine_module


@dataclass
class Bucket:
    lo: int  # [lo, hi) offsets into the flat gradient buffer
    hi: int
    names: list[str] = field(default_factory=list)
    pending: int = 0  # parameters of this bucket not yet final in the current micro-batch


class GradReducer:
    """comm: a Communicator; store: the model's ParamStore; model: its root Module (for the hooks)."""

    def __init__(self, comm, store, model, bucket_mb: float = 1.0, overlap: bool = True):
        self.comm, self.store, self.model = comm, store, model
        # Overlap only where the transport really runs in the background: on a blocking one (Ray's shared-memory
        # group, MPICH) launching bucket by bucket during backward only adds synchronisation points.
        self.overlap = bool(overlap) and bool(getattr(comm, "overlaps_compute", False))
        self.buckets = make_buckets(store, int(bucket_mb * (1 << 20)))
        self._bucket_of = {n: i for i, b in enumerate(self.buckets) for n in b.names}
        # module -> names of the Params it registered directly; Param name -> number of owning modules
        self._owned: dict[int, list[str]] = {}
        owners: dict[str, int] = {}
        by_id = {id(p): n for n, p in store}
        for _, m in model.named_modules():
            names = [by_id[id(p)] for p in m._params.values() if p is not None and id(p) in by_id]
            if names:
                self._owned[id(m)] = names
                for n in names:
                    owners[n] = owners.get(n, 0) + 1
        self._n_owners = owners
        self._active = False
        self._sync = True
        self._reset_state()
        self.comm_wait_s = 0.0  # time finish() spent blocked on communication (last step)
        self.launch_s = 0.0  # time spent inside launches (last step)

    @property
    def enabled(self) -> bool:
        return self.comm.world_size > 1

    def _reset_state(self) -> None:
        self._calls: dict[int, int] = {}  # module id -> forward calls not yet matched by a backward
        self._owner_left = dict(self._n_owners)  # param -> owning modules not yet done
        for b in self.buckets:
            b.pending = len(b.names)
        self._handles: list = [None] * len(self.buckets)
        self._next = 0  # next bucket to launch (in order)

    # -- micro-batch protocol ------------------------------------------------------------------------------------
    def begin(self, sync: bool = True) -> None:
        """Call before the forward of each micro-batch; sync=False for all but the last of an accumulation."""
        self._sync = bool(sync)
        self._detach()
        self._reset_state()
        self.comm_wait_s = 0.0
        self.launch_s = 0.0
        if self.enabled and self._sync and self.overlap:
            engine_module._HOOKS.append(self._hook)
            self._active = True

    def finish(self) -> None:
        """Call after backward: launches the buckets not yet launched and waits for all of them."""
        self._detach()
        if not (self.enabled and self._sync):
            return
        for i in range(self._next, len(self.buckets)):
            self._launch(i)
        self._next = len(self.buckets)
        t0 = time.perf_counter()
        for h in self._handles:
            if h is not None:
                h.wait()
        self.comm_wait_s += time.perf_counter() - t0
        self._handles = [None] * len(self.buckets)

    def close(self) -> None:
        self._detach()

    # -- internals -------------------------------------------------------------------------------------------------
    def _detach(self) -> None:
        if self._active:
            try:
                engine_module._HOOKS.remove(self._hook)
            except ValueError:
                pass
            self._active = False

    def _hook(self, module, phase: str, value) -> None:
        key = id(module)
        names = self._owned.get(key)
        if names is None:
            return
        if phase == "forward":
            self._calls[key] = self._calls.get(key, 0) + 1
            return
        if phase != "backward":
            return
        left = self._calls.get(key, 0) - 1
        self._calls[key] = left
        if left != 0:
            return  # more backward calls of this module will come (used twice), or an unmatched event
        ready_any = False
        for n in names:
            self._owner_left[n] -= 1
            if self._owner_left[n] == 0:
                b = self.buckets[self._bucket_of[n]]
                b.pending -= 1
                ready_any |= b.pending == 0
        if ready_any:
            while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
                self._launch(self._next)
                self._next += 1

    def _launch(self, i: int) -> None:
        b = self.buckets[i]
        t0 = time.perf_counter()
        self._handles[i] = self.comm.iallreduce(self.store.grad[b.lo:b.hi])
        self.launch_s += time.perf_counter() - t0


def make_buckets(store, bucket_bytes: int) -> list[Bucket]:
    """Buckets over store.grad in reverse registration order, cut at parameter boundaries; a bucket closes once it
    reaches bucket_bytes (a parameter larger than that is a bucket of its own; the communicator chunks it)."""
    itemsize = store.grad.itemsize
    buckets: list[Bucket] = []
    cur: Bucket | None = None
    for name, p in reversed(list(store)):
        if p.size == 0:
            continue
        if cur is None:
            cur = Bucket(lo=p.offset, hi=p.offset + p.size)
        cur.lo = p.offset  # reverse order: each parameter sits right below the previous one
        cur.names.append(name)
        if (cur.hi - cur.lo) * itemsize >= bucket_bytes:
            buckets.append(cur)
            cur = None
    if cur is not None:
        buckets.append(cur)
    return buckets
