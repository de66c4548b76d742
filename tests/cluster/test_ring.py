"""Ring all-reduce (cluster/comm/ring.py) over socketpairs, one thread per rank: the rank-ordered sum, bitwise in
deterministic mode, bitwise identical on every rank in both modes; odd sizes, sizes below W, pieces smaller than a
chunk; the background transport; a silent peer times out naming it; socket tuning."""
import socket
import threading

import numpy as np
import pytest

from ndtrain.cluster.comm.counters import CommCounters
from ndtrain.cluster.comm.ring import RingAllreduce, SocketLink, ring_over_peers, socketpair_ring, tune_socket


def rank_ordered_sum(xs):
    acc = xs[0].copy()
    for x in xs[1:]:
        acc += x  # ((x0 + x1) + x2) + ...: the star's and the shared-memory path's order
    return acc


def run_ranks(W, fn, timeout=60):
    """fn(rank, ring) in one thread per rank; returns their results (re-raises the first error)."""
    links = socketpair_ring(W, timeout=20)
    out, errors = [None] * W, []

    def body(r, **kw):
        ring = kw["ring"]
        try:
            out[r] = fn(r, ring)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
        finally:
            ring.close()

    rings = [RingAllreduce(r, W, *links[r], deterministic=fn.deterministic, piece_bytes=fn.piece_bytes)
             for r in range(W)]
    ts = [threading.Thread(target=body, args=(r,), kwargs={"ring": rings[r]}) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a rank hung"
    if errors:
        raise errors[0]
    return out, rings


def make(deterministic, piece_bytes=256):
    def deco(fn):
        fn.deterministic, fn.piece_bytes = deterministic, piece_bytes
        return fn
    return deco


def inputs(W, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    # wide dynamic range: a different summation order would show in the last bits
    return [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype) for _ in range(W)]


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 5, 97, 1000, 4099])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic_ring_is_bitwise_the_rank_ordered_sum(W, n, dtype):
    xs = inputs(W, n, dtype, seed=n + W)
    want = rank_ordered_sum(xs)

    @make(deterministic=True, piece_bytes=64)  # many pieces: the pipeline, not one message
    def fn(r, ring):
        buf = xs[r].copy()
        ring.allreduce(buf)
        return buf

    got, _ = run_ranks(W, fn)
    for r in range(W):
        np.testing.assert_array_equal(got[r], want, err_msg=f"rank {r}")
        assert got[r].tobytes() == want.tobytes()


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1001])
def test_ring_equals_the_sum_and_is_bitwise_identical_on_every_rank(W, n):
    xs = inputs(W, n, np.float32, seed=7 * n + W)
    want = rank_ordered_sum([x.astype(np.float64) for x in xs])

    @make(deterministic=False, piece_bytes=64)
    def fn(r, ring):
        buf = xs[r].copy()
        ring.allreduce(buf)
        ring.allreduce(buf2 := xs[r].copy())  # a second call on the same links
        return buf, buf2

    got, rings = run_ranks(W, fn)
    for r in range(W):
        np.testing.assert_allclose(got[r][0], want, rtol=1e-5, atol=1e-3)
        assert got[r][0].tobytes() == got[0][0].tobytes(), f"rank {r} differs from rank 0"
        assert got[r][1].tobytes() == got[r][0].tobytes()
    if W == 2:  # two ranks: the ring's order is the rank order (a + b == b + a in IEEE arithmetic)
        assert got[0][0].tobytes() == rank_ordered_sum(xs).tobytes()
    # the counters: 2 (W-1)/W x N each way per call in the ring schedule (chunks rounded to elements)
    for r, ring in enumerate(rings):
        c = ring.counters.snapshot()
        assert c["collectives"] == 2 and c["payload_bytes"] == 2 * xs[r].nbytes
        bounds = [n * i // W for i in range(W + 1)]
        sizes = [bounds[i + 1] - bounds[i] for i in range(W)]
        recv_chunks = [(r - s - 1) % W for s in range(W - 1)] + [(r - t) % W for t in range(W - 1)]
        assert c["bytes_received"] == 2 * 4 * sum(sizes[k] for k in recv_chunks)
        assert c["bytes_sent"] > 0 and c["blocked_s"] > 0


def test_ring_moves_fewer_bytes_per_rank_than_the_chain_for_W4():
    W, n = 4, 4000
    xs = inputs(W, n, np.float32)
    sent = {}
    for det in (False, True):
        @make(deterministic=det, piece_bytes=1024)
        def fn(r, ring):
            b = xs[r].copy()
            ring.allreduce(b)
            return ring.counters.snapshot()["bytes_sent"]
        got, _ = run_ranks(W, fn)
        sent[det] = max(got)
    assert sent[False] == 2 * (W - 1) * n * 4 // W      # 6000 elements x 4 bytes
    assert sent[True] == 2 * n * 4                      # the chain: N to reduce and N to pass on the sum


@pytest.mark.parametrize("deterministic", [False, True])
def test_iallreduce_runs_in_the_background_in_call_order(deterministic):
    W = 3
    xs = [inputs(W, n, np.float64, seed=n) for n in (10, 3000, 1)]

    @make(deterministic=deterministic, piece_bytes=512)
    def fn(r, ring):
        bufs = [x[r].copy() for x in xs]
        handles = [ring.iallreduce(b) for b in bufs]  # three buckets in flight at once
        for h in handles:
            h.wait()
        return bufs

    got, _ = run_ranks(W, fn)
    for k, x in enumerate(xs):
        for r in range(W):
            assert got[r][k].tobytes() == got[0][k].tobytes()
            if deterministic:
                assert got[r][k].tobytes() == rank_ordered_sum(x).tobytes()
            else:
                np.testing.assert_allclose(got[r][k], rank_ordered_sum(x), rtol=1e-12, atol=1e-9)


def test_a_silent_peer_times_out_naming_it():
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    ring = RingAllreduce(0, 2, SocketLink(a, 0, 1, timeout=0.3), SocketLink(d, 0, 1, timeout=0.3),
                         deterministic=True)
    try:
        with pytest.raises(TimeoutError, match="no data from rank 1"):
            ring.allreduce(np.ones(10, np.float32))
        h = ring.iallreduce(np.ones(10, np.float32))  # the background path reports the same
        with pytest.raises(TimeoutError, match="rank 1"):
            h.wait()
    finally:
        ring.close()
        for s in (a, b, c, d):
            s.close()


def test_a_slow_but_moving_peer_is_not_a_timeout():
    """The link timeout counts time without progress: a peer that trickles bytes slower than the timeout per
    message, but faster than it per byte, is waited for."""
    a, b = socket.socketpair()
    link = SocketLink(a, 0, 1, timeout=0.5)
    payload = np.arange(16, dtype=np.float32).tobytes()

    def trickle():
        for i in range(0, len(payload), 8):
            threading.Event().wait(0.15)  # 8 chunks x 0.15 s = 1.2 s in all, > the 0.5 s timeout
            b.sendall(payload[i:i + 8])

    t = threading.Thread(target=trickle)
    t.start()
    got = bytearray(len(payload))
    link.recv_into(memoryview(got))
    t.join()
    assert bytes(got) == payload
    a.close()
    b.close()


def test_world_of_one_and_empty_buffers_are_no_ops():
    ring = RingAllreduce(0, 1, None, None)
    x = np.arange(5, dtype=np.float32)
    ring.allreduce(x)
    np.testing.assert_array_equal(x, np.arange(5, dtype=np.float32))
    ring.iallreduce(x).wait()
    ring.close()

    @make(deterministic=False)
    def fn(r, ring):
        e = np.zeros(0, np.float32)
        ring.allreduce(e)
        return e.size
    assert run_ranks(3, fn)[0] == [0, 0, 0]


def test_bad_buffers_are_refused():
    ring = RingAllreduce(0, 1, None, None)
    with pytest.raises(ValueError, match="1-D C-contiguous"):
        ring.allreduce(np.zeros((4, 4), np.float32)[:, 0])
    with pytest.raises(ValueError, match="outside world"):
        RingAllreduce(2, 2, None, None)


def test_tune_socket_sets_nodelay_and_leaves_autotuning_for_a_small_bdp():
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        before = cli.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        got = tune_socket(cli, bdp_bytes=150_000)  # good Wi-Fi: 200 Mbit/s x 6 ms
        assert got["nodelay"] is True
        assert got["rcvbuf"] == before  # autotuning (up to tcp_rmem's max) covers 2 x 150 KB: left alone
        available = open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().split()
        assert got["congestion"] == ("bbr" if "bbr" in available else got["congestion"])
        big = tune_socket(conn, bdp_bytes=64 << 20)  # beyond autotuning: set explicitly (capped by the kernel)
        assert big["rcvbuf"] > before
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_counters_delta_and_blocking():
    c = CommCounters()
    s0 = c.snapshot()
    c.add(sent=10, received=20, payload=40, collectives=1)
    with c.blocking():
        threading.Event().wait(0.01)
    d = CommCounters.delta(c.snapshot(), s0)
    assert (d["bytes_sent"], d["bytes_received"], d["payload_bytes"], d["collectives"]) == (10, 20, 40, 1)
    assert d["blocked_s"] >= 0.009 and d["estimated"] is False


def tcp_mesh(W):
    """peers[r][q]: rank r's connected loopback TCP socket to rank q (a full mesh, as cluster/comm/tcp.py holds)."""
    peers = [dict() for _ in range(W)]
    for r in range(W):
        for q in range(r + 1, W):
            srv = socket.create_server(("127.0.0.1", 0))
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
            srv.close()
            peers[r][q], peers[q][r] = a, b
    return peers


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_ring_over_a_tcp_mesh(W, deterministic):
    """Real TCP sockets (both directions of one socket for W = 2), tuned: NODELAY on, large buffers."""
    peers = tcp_mesh(W)
    n = 300_001  # 1.2 MB of float32: many pieces, both directions in flight at once
    xs = inputs(W, n, np.float32, seed=W)
    rings = [ring_over_peers(r, W, peers[r], timeout=20, deterministic=deterministic, piece_bytes=64 << 10)
             for r in range(W)]
    out = [None] * W
    errors = []

    def body(r):
        try:
            b = xs[r].copy()
            rings[r].iallreduce(b).wait()
            out[r] = b
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=body, args=(r,)) for r in range(W)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for ring in rings:
        ring.close()
    assert all(peers[r][(r + 1) % W].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for r in range(W))
    for p in peers:
        for s in p.values():
            s.close()
    assert not errors, errors
    want = rank_ordered_sum(xs)
    for r in range(W):
        assert out[r].tobytes() == out[0].tobytes()
        if deterministic or W == 2:
            assert out[r].tobytes() == want.tobytes()  # the star's sum, bit for bit
        else:
            np.testing.assert_allclose(out[r], want, rtol=1e-4, atol=1e-2)
