"""The TCP mesh (cluster/comm/tcp.py) all-reduces on the ring's deterministic schedule: the rank-ordered sum, bit
for bit (what the star through rank 0 computed, and the shared-memory path computes), identical on every rank, with
~2N bytes per rank whatever W instead of rank 0's (W-1) N each way; its counters are the socket bytes."""
import threading
import traceback

import numpy as np
import pytest

from ndtrain.cluster.comm.auth import derive_key
from ndtrain.cluster.comm.tcp import TcpGroup

KEY = derive_key("test-run-secret", b"mesh")


def run_mesh(W, fn, piece_bytes=8192):
    groups = [TcpGroup(r, W, key=KEY, timeout=20, piece_bytes=piece_bytes) for r in range(W)]
    addrs = [("127.0.0.1", g.port) for g in groups]
    out, errors = [None] * W, {}

    def body(r):
        try:
            groups[r].connect(addrs)
            out[r] = fn(r, groups[r])
        except BaseException:  # noqa: BLE001
            errors[r] = traceback.format_exc()  # the whole trace, so a failure names its line

    ts = [threading.Thread(target=body, args=(r,)) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for g in groups:
        g.close()
    assert errors == {}
    return out


@pytest.mark.parametrize("W", [2, 3, 4])
def test_tcp_allreduce_is_bitwise_the_rank_ordered_sum(W):
    n = 50_001
    rng = np.random.default_rng(W)
    xs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-4, 5, n)).astype(np.float32) for _ in range(W)]
    want = xs[0].copy()
    for x in xs[1:]:
        want += x  # ((x0 + x1) + x2) + ...: the star's order

    def fn(r, g):
        before = g.counters.snapshot()
        b = xs[r].copy()
        g.allreduce(b)
        return b, g.counters.delta(g.counters.snapshot(), before)

    out = run_mesh(W, fn)
    N = 4 * n
    for r in range(W):
        assert out[r][0].tobytes() == want.tobytes(), f"rank {r}"
        c = out[r][1]
        # the chain: every rank sends its partial sum (N; rank W-1: the final sum to rank 0), and ranks 0..W-3 also
        # pass the final sums on (N): at most 2N, where the star's rank 0 sent (W-1) N
        assert c["bytes_sent"] == N * (2 if r < W - 2 else 1)
        assert c["bytes_received"] == N * (2 if 0 < r < W - 1 else 1)
        assert c["payload_bytes"] == N and c["collectives"] == 1 and c["blocked_s"] > 0


def test_tcp_counters_count_the_other_collectives_on_the_sockets():
    def fn(r, g):
        before = g.counters.snapshot()
        b = np.full(1000, r, np.float64)
        g.broadcast(b, root=1)
        assert (b == 1).all()
        g.allgather_bytes(b"xy")
        return g.counters.delta(g.counters.snapshot(), before)

    c0, c1 = run_mesh(2, fn)
    assert c1["bytes_sent"] >= 8000 and c0["bytes_received"] >= 8000  # the broadcast's payload from rank 1
    assert c0["bytes_sent"] == c1["bytes_received"] and c1["bytes_sent"] == c0["bytes_received"]


def test_tcp_iallreduce_in_the_background_then_other_collectives_in_order():
    """Buckets started with iallreduce move on the transport thread; a broadcast or allgather issued before
    waiting on them runs after them on every rank (the same byte order on the sockets), so nothing interleaves."""
    from ndtrain.cluster.comm.ray_comm import RayCommunicator
    W = 3
    sizes = (1000, 70_000, 3)
    xs = {n: [np.random.default_rng(n + r).standard_normal(n).astype(np.float32) for r in range(W)]
          for n in sizes}

    def fn(r, g):
        comm = RayCommunicator(r, W, g)
        assert comm.overlaps_compute is True
        bufs = [xs[n][r].copy() for n in sizes]
        handles = [comm.iallreduce(b) for b in bufs]
        b = np.full(500, r, np.float64)
        comm.broadcast(b, root=2)                    # before any wait: runs after the three all-reduces
        gathered = comm.allgather_obj(r)
        for h in handles:
            h.wait()
        return bufs, b, gathered

    out = run_mesh(W, fn)
    for k, n in enumerate(sizes):
        want = xs[n][0].copy()
        for x in xs[n][1:]:
            want += x
        for r in range(W):
            assert out[r][0][k].tobytes() == want.tobytes()
    assert all((o[1] == 2).all() and o[2] == [0, 1, 2] for o in out)


@pytest.mark.parametrize("W", [2, 3, 4])
def test_ring_allgather_is_bitwise_the_star_and_halves_rank_0s_traffic(W):
    """allgather_bytes goes round the ring (W-1 hops, every rank sending and receiving at once); the records, of
    different lengths per rank (one empty), come back bitwise as the star through rank 0 returns them. The array
    all-gather (compressed payloads) and its queued form agree, and rank 0 sends (W-1) rows, not (W-1) x W."""
    rng = np.random.default_rng(W)
    records = [rng.integers(0, 256, size=0 if r == 1 else 1000 * r + 17, dtype=np.uint8).tobytes()
               for r in range(W)]
    payloads = [rng.integers(0, 65535, size=30_001, dtype=np.uint16) for _ in range(W)]

    def fn(r, g):
        before = g.counters.snapshot()["bytes_sent"]
        ring = g.allgather_bytes(records[r])
        sent = g.counters.snapshot()["bytes_sent"] - before
        star = g._allgather_bytes_star(records[r])
        rows = g.allgather_array(payloads[r])
        queued = g.iallgather_array(payloads[r]).wait()
        return ring, star, rows, queued, sent

    out = run_mesh(W, fn)
    for r in range(W):
        ring, star, rows, queued, sent = out[r]
        assert ring == star == records
        assert np.array_equal(rows, np.stack(payloads)) and np.array_equal(queued, rows)
        # every rank forwards every record but its successor's own: sum(records) - len(records[r+1]) + lengths
        assert sent == sum(map(len, records)) - len(records[(r + 1) % W]) + 8 * (W - 1)


def test_ring_allgather_over_socketpairs_with_small_pieces():
    from ndtrain.cluster.comm.ring import RingAllreduce, socketpair_ring
    W = 3
    links = socketpair_ring(W)
    rings = [RingAllreduce(r, W, *links[r], piece_bytes=64) for r in range(W)]
    mine = [np.arange(1000, dtype=np.float32) * (r + 1) - 0.0 for r in range(W)]
    out = [None] * W

    def body(r):
        out[r] = rings[r].allgather(mine[r])

    ts = [threading.Thread(target=body, args=(r,)) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for ring in rings:
        ring.close()
    for r in range(W):
        assert np.array_equal(out[r], np.stack(mine))


def test_measured_link_sizes_the_ring_buffers_to_its_bdp(monkeypatch):
    """TcpGroup.tune_link (called by link_probe.probe_link) hands bandwidth x latency to ring.tune_socket, and the
    neighbour sockets' buffers grow to 2 x BDP where autotuning would not reach it (here: its limit patched low)."""
    import socket as socket_mod
    from ndtrain.cluster.comm import ring as ring_mod
    from ndtrain.cluster.comm.ray_comm import RayCommunicator
    from ndtrain.cluster.link_probe import probe_link

    monkeypatch.setattr(ring_mod, "autotune_max", lambda name: 64 << 10)
    link = {"bandwidth_Bps": 50e6, "latency_s": 0.01}  # 500 KB in flight

    def fn(r, g):
        sock = g.peers[1 - r]
        before = sock.getsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVBUF)
        g.tune_link(link)
        after = (sock.getsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVBUF),
                 sock.getsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_SNDBUF))
        bdp = g.bdp_bytes
        probed = probe_link(RayCommunicator(r, 2, g), probe_bytes=1 << 16)
        return before, after, bdp, probed, g.bdp_bytes

    for before, (rcv, snd), bdp, probed, measured in run_mesh(2, fn):
        assert bdp == 500_000
        assert measured == int(probed["bandwidth_Bps"] * probed["latency_s"]) > 0  # the start-up probe tunes too
        want = min(2 * bdp, ring_mod.core_max("rmem"))  # root: SO_RCVBUFFORCE reaches 2 x BDP; else rmem_max
        assert rcv >= want and rcv > before and snd >= min(2 * bdp, ring_mod.core_max("wmem"))
        assert probed["bandwidth_Bps"] > 0
