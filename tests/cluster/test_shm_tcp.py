"""The Ray backend's transports on their own: shared-memory and TCP collectives between real processes/threads."""
import multiprocessing as mp
import os
import threading
import uuid

import numpy as np
import pytest

from ndtrain.cluster.comm.ray_comm import RayCommunicator
from ndtrain.cluster.comm.shm import ShmGroup, ShmTimeout
from ndtrain.cluster.comm.auth import derive_key
from ndtrain.cluster.comm.tcp import TcpGroup

KEY = derive_key("test-run-secret", b"mesh")

SIZES = (1, 5, 1000, 4099, 20000)  # with 16 KB slots: one piece, and several pieces of 4096 / 2048


def _expected(n, dtype, W):
    return sum((np.arange(n, dtype=dtype) * (r + 1) + r) for r in range(W))


def _shm_rank(path, rank, W, out_q):
    try:
        g = ShmGroup(path, rank, W, create=rank == 0, slot_bytes=16384, timeout=20)
        g.barrier()
        if rank == 0:
            g.unlink()
        comm = RayCommunicator(rank, W, g)
        for n in SIZES:
            for dtype in (np.float32, np.float64):
                x = np.arange(n, dtype=dtype) * (rank + 1) + rank
                comm.allreduce(x)
                np.testing.assert_array_equal(x, _expected(n, dtype, W))
        b = np.full(10000, rank, np.float64)
        comm.broadcast(b, root=W - 1)
        assert np.all(b == W - 1)
        assert comm.allgather_obj({"r": rank}) == [{"r": r} for r in range(W)]
        comm.barrier()
        out_q.put((rank, "ok"))
    except BaseException as e:  # report to the test instead of dying silently
        out_q.put((rank, repr(e)))


@pytest.mark.parametrize("W", [2, 3])
def test_shm_collectives_between_processes(W):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    path = f"/dev/shm/ndtrain-test-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_shm_rank, args=(path, r, W, q)) for r in range(W)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in range(W))
    for p in procs:
        p.join(timeout=10)
    assert results == {r: "ok" for r in range(W)}
    assert not os.path.exists(path)


def test_shm_wait_times_out_naming_the_missing_rank(tmp_path):
    path = f"/dev/shm/ndtrain-test-{uuid.uuid4().hex}"
    g = ShmGroup(path, 0, 2, create=True, slot_bytes=4096, timeout=0.3)
    try:
        with pytest.raises(ShmTimeout, match="for rank 1"):
            g.allreduce(np.ones(10, np.float32))
    finally:
        g.unlink()
        g.close()


def test_shm_abort_stops_the_other_rank():
    path = f"/dev/shm/ndtrain-test-{uuid.uuid4().hex}"
    g0 = ShmGroup(path, 0, 2, create=True, slot_bytes=4096, timeout=30)
    g1 = ShmGroup(path, 1, 2, create=False, slot_bytes=4096, timeout=30)
    g0.unlink()
    g1.abort()  # rank 1 fails; rank 0 must not wait 30 s for it
    with pytest.raises(RuntimeError, match="rank 1 aborted"):
        g0.barrier()


def test_tcp_collectives_between_threads():
    W = 3
    groups = [TcpGroup(r, W, key=KEY, timeout=20, piece_bytes=8192) for r in range(W)]
    addrs = [("127.0.0.1", g.port) for g in groups]
    errors = {}

    def rank_main(r):
        try:
            g = groups[r]
            g.connect(addrs)
            comm = RayCommunicator(r, W, g)
            for n in SIZES:
                x = np.arange(n, dtype=np.float64) * (r + 1) + r
                comm.allreduce(x)
                np.testing.assert_array_equal(x, _expected(n, np.float64, W))
            b = np.full(5000, r, np.float32)
            comm.broadcast(b, root=1)
            assert np.all(b == 1)
            assert comm.allgather_obj(r * 10) == [0, 10, 20]
            comm.barrier()
        except BaseException as e:
            errors[r] = repr(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for g in groups:
        g.close()
    assert errors == {}


def test_tcp_timeout_names_the_silent_rank():
    a, b = TcpGroup(0, 2, key=KEY, timeout=0.3), TcpGroup(1, 2, key=KEY, timeout=0.3)
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    t = threading.Thread(target=b.connect, args=(addrs,))
    t.start()
    a.connect(addrs)
    t.join()
    with pytest.raises(TimeoutError, match="from rank 1"):
        a.allreduce(np.ones(10))  # rank 1 never sends
    a.close()
    b.close()
