"""GradReducer: bucket layout, overlap with backward, accumulation, tied weights (one process, a recording comm)."""
import numpy as np
import pytest

from ndtrain.cluster.comm.base import Communicator, Handle
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.reducer import GradReducer, make_buckets
from ndtrain.engine import Module, ParamStore, Sequential
from ndtrain.engine import module as engine_module
from ndtrain.engine.layers import Linear


@pytest.fixture(autouse=True)
def no_leftover_hooks():
    yield
    leftover = list(engine_module._HOOKS)
    engine_module._HOOKS.clear()
    assert leftover == [], "a reducer left its hook installed"


class FakeWorld(Communicator):
    """Pretends to be rank 0 of `world_size` ranks whose gradients are `others` (one flat array per other rank)."""

    overlaps_compute = True  # behaves like a transport that progresses in the background

    def __init__(self, others, log):
        self.rank, self.world_size = 0, len(others) + 1
        self.others, self.log, self.base = others, log, None

    def iallreduce(self, buf):
        lo = (buf.__array_interface__["data"][0] - self.base.__array_interface__["data"][0]) // buf.itemsize
        self.log.append(("launch", lo, lo + buf.size))
        comm = self

        class H(Handle):
            def wait(self):
                for o in comm.others:
                    np.add(buf, o[lo:lo + buf.size], out=buf)
                comm.log.append(("wait", lo))
        return H()

    def allreduce(self, buf):
        self.iallreduce(buf).wait()

    def broadcast(self, buf, root=0):
        pass

    def barrier(self):
        pass

    def allgather_obj(self, obj):
        return [obj] * self.world_size


class Logged(Linear):
    """A Linear that logs when its backward ran (to check that buckets launch during backward)."""

    def __init__(self, *a, log, tag, **k):
        super().__init__(*a, **k)
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_tag", tag)

    def forward(self, x, *, train):
        y, bwd = super().forward(x, train=train)

        def backward(dy):
            self._log.append(("bwd", self._tag))
            return bwd(dy)
        return y, backward


def make_model(log, widths=(6, 32, 32, 32, 4), dtype=np.float64):
    layers = [Logged(a, b, log=log, tag=i) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
    model = Sequential(*layers)
    return model, ParamStore.from_module(model, dtype=dtype, seed=3)


def run_step(model, x):
    y, backward = model(x)
    backward(np.ones_like(y))


def test_buckets_reverse_order_cover_buffer_and_respect_size():
    model, store = make_model([])
    bucket_bytes = 33 * 32 * 8  # a little over one 32x32 weight + bias
    buckets = make_buckets(store, bucket_bytes)
    assert buckets[0].hi == store.size and buckets[-1].lo == 0
    for a, b in zip(buckets, buckets[1:]):
        assert b.hi == a.lo  # contiguous, descending
    names = [n for b in buckets for n in b.names]
    assert names == [n for n, _ in reversed(list(store))]
    for b in buckets:
        size = (b.hi - b.lo) * 8
        # closed as soon as it reached the target: dropping its last parameter would leave it under the target
        last = store[b.names[-1]]
        assert size - last.size * 8 < bucket_bytes
    assert len(buckets) >= 3


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bucket_mb", [0.004, 0.02, 100.0])
def test_result_equals_plain_allreduce_of_whole_buffer(overlap, bucket_mb):
    log = []
    model, store = make_model(log)
    rng = np.random.default_rng(0)
    others = [rng.standard_normal(store.size) for _ in range(2)]
    comm = FakeWorld(others, log)
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=bucket_mb, overlap=overlap)
    x = rng.standard_normal((5, 6))
    store.zero_grad()
    run_step(model, x)
    expected = store.grad + others[0] + others[1]  # plain all-reduce of the whole buffer
    store.zero_grad()
    reducer.begin(sync=True)
    run_step(model, x)
    reducer.finish()
    np.testing.assert_array_equal(store.grad, expected)
    launches = [e for e in log if e[0] == "launch"]
    assert [(lo, hi) for _, lo, hi in launches] == [(b.lo, b.hi) for b in reducer.buckets]
    assert engine_module._HOOKS == []


def test_overlap_launches_buckets_during_backward():
    log = []
    model, store = make_model(log)
    comm = FakeWorld([np.zeros(store.size)], log)
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=33 * 32 * 8 / (1 << 20), overlap=True)
    reducer.begin()
    run_step(model, np.ones((2, 6)))
    first_launch = next(i for i, e in enumerate(log) if e[0] == "launch")
    last_bwd = max(i for i, e in enumerate(log) if e[0] == "bwd")
    assert first_launch < last_bwd  # communication started while backward was still running
    # bucket 0 holds layers 3 and 2 (it closes once it passes the size): launched right after layer 2's backward
    assert reducer.buckets[0].names == ["3.b", "3.W", "2.b", "2.W"]
    assert log[first_launch - 1] == ("bwd", 2) and log[first_launch + 1] == ("bwd", 1)
    reducer.finish()
    assert sum(e[0] == "wait" for e in log) == len(reducer.buckets)


def test_blocking_transport_is_not_overlapped():
    """A communicator whose iallreduce blocks (Ray's shared-memory group) gets one launch per bucket in finish()."""
    log = []
    model, store = make_model(log)
    comm = FakeWorld([np.zeros(store.size)], log)
    comm.overlaps_compute = False
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=0.001, overlap=True)
    assert not reducer.overlap
    reducer.begin()
    run_step(model, np.ones((2, 6)))
    assert not any(e[0] == "launch" for e in log)
    reducer.finish()
    assert sum(e[0] == "launch" for e in log) == len(reducer.buckets) > 1


def test_no_overlap_launches_only_in_finish():
    log = []
    model, store = make_model(log)
    comm = FakeWorld([np.zeros(store.size)], log)
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=0.001, overlap=False)
    reducer.begin()
    run_step(model, np.ones((2, 6)))
    assert not any(e[0] == "launch" for e in log)
    reducer.finish()
    assert sum(e[0] == "launch" for e in log) == len(reducer.buckets) > 1


def test_accumulation_communicates_only_on_last_micro_batch():
    log = []
    model, store = make_model(log)
    rng = np.random.default_rng(1)
    other = rng.standard_normal(store.size)
    comm = FakeWorld([other], log)
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=0.01)
    xs = [rng.standard_normal((3, 6)) for _ in range(3)]
    store.zero_grad()
    for x in xs:
        run_step(model, x)
    expected = store.grad + other
    store.zero_grad()
    for i, x in enumerate(xs):
        reducer.begin(sync=i == len(xs) - 1)
        run_step(model, x)
        reducer.finish()
        if i < len(xs) - 1:
            assert not any(e[0] == "launch" for e in log)
    np.testing.assert_allclose(store.grad, expected, rtol=1e-12)
    assert sum(e[0] == "launch" for e in log) == len(reducer.buckets)


class TwiceUsed(Module):
    """One Linear applied twice (a shared block): its grads are final only after its second backward."""

    def __init__(self, log):
        super().__init__()
        self.inp = Logged(4, 8, log=log, tag="inp")
        self.shared = Logged(8, 8, log=log, tag="shared")

    def forward(self, x, *, train):
        h, b0 = self.inp(x, train=train)
        h1, b1 = self.shared(h, train=train)
        h2, b2 = self.shared(h1, train=train)

        def backward(dy):
            return b0(b1(b2(dy)))
        return h2, backward


def test_module_used_twice_launches_after_last_backward():
    log = []
    model = TwiceUsed(log)
    store = ParamStore.from_module(model, dtype=np.float64)
    comm = FakeWorld([np.zeros(store.size)], log)
    comm.base = store.grad
    reducer = GradReducer(comm, store, model, bucket_mb=8 * 9 * 8 / (1 << 20))  # shared.W + shared.b per bucket
    assert reducer.buckets[0].names == ["shared.b", "shared.W"]
    reducer.begin()
    run_step(model, np.ones((2, 4)))
    shared_bwds = [i for i, e in enumerate(log) if e == ("bwd", "shared")]
    first_launch = next(i for i, e in enumerate(log) if e[0] == "launch")
    assert len(shared_bwds) == 2 and shared_bwds[1] < first_launch
    reducer.finish()


def test_world_size_one_does_nothing():
    model, store = make_model([])
    reducer = GradReducer(LocalCommunicator(), store, model)
    reducer.begin()
    assert engine_module._HOOKS == []
    run_step(model, np.ones((2, 6)))
    before = store.grad.copy()
    reducer.finish()
    np.testing.assert_array_equal(store.grad, before)
