"""Communication counters on the local and shared-memory communicators (MPI's: tests/cluster/mpi_collectives_script.py,
the ring's: test_ring.py): bytes each way, payload, collectives, time blocked."""
import threading

import numpy as np
import pytest

from ndtrain.cluster.comm.counters import CommCounters, allreduce_bytes
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.comm.shm import ShmGroup


def test_local_counts_the_payload_and_moves_nothing():
    c = LocalCommunicator()
    c.allreduce(np.zeros(10, np.float32))
    c.iallreduce(np.zeros(5, np.float64)).wait()
    s = c.counters.snapshot()
    assert (s["payload_bytes"], s["collectives"], s["bytes_sent"], s["bytes_received"]) == (80, 2, 0, 0)
    assert LocalCommunicator().counters is not c.counters  # per communicator, not shared


@pytest.mark.parametrize("W,n", [(2, 1000), (3, 10), (4, 4099)])
def test_shm_counts_exactly_what_other_ranks_read(tmp_path, W, n):
    path = str(tmp_path / "shm")
    out, errors = [None] * W, []
    slot = 4096  # several pieces for n = 4099 float32

    def rank(r):
        try:
            g = ShmGroup(path, r, W, create=r == 0, slot_bytes=slot, timeout=20)  # the others wait for rank 0's
            x = np.full(n, r + 1.0, np.float32)
            g.allreduce(x)
            assert (x == W * (W + 1) / 2).all()
            out[r] = g.counters.snapshot()
            g.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    if errors:
        raise errors[0]
    per = slot // 4
    for r in range(W):
        want = 0
        for start in range(0, n, per):
            m = min(per, n - start)
            share = m * (r + 1) // W - m * r // W
            want += (m + (W - 2) * share) * 4
        assert out[r]["bytes_sent"] == out[r]["bytes_received"] == want, (r, out[r])
        assert out[r]["payload_bytes"] == n * 4 and out[r]["collectives"] == 1 and out[r]["blocked_s"] > 0
    # what all ranks sent, all ranks received; about 2 (W-1)/W x N each
    assert sum(o["bytes_sent"] for o in out) == sum(o["bytes_received"] for o in out)
    assert abs(out[0]["bytes_sent"] - allreduce_bytes(4 * n, W)) <= 4 * W * (n // per + 1)


def test_allreduce_bytes():
    assert allreduce_bytes(1000, 1) == 0
    assert allreduce_bytes(1000, 2) == 1000
    assert allreduce_bytes(1200, 4) == 1800


def test_counters_are_safe_across_threads():
    c = CommCounters()

    def work():
        for _ in range(10000):
            c.add(sent=1, received=2)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert (c.bytes_sent, c.bytes_received) == (40000, 80000)
