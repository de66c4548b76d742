"""The coordinator's socket server under abuse, on 127.0.0.1: the token is proved (HMAC) before anything is parsed,
lines are bounded, bad input is dropped quietly and counted, idle connections time out, and a flood of garbage
connections costs neither threads nor memory while a run beside it completes."""
import json
import os
import socket
import threading
import time

import pytest

from ndtrain.cluster import coord_server
from ndtrain.cluster.comm import auth
from ndtrain.cluster.coord_server import dial
from ndtrain.cluster.coordinator import Coordinator
from ndtrain.cluster.metrics_channel import RankReporter, encode


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _closed_by_server(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


@pytest.fixture
def coord(tmp_path):
    c = Coordinator(2, ranks_file=tmp_path / "ranks.json", start_timeout=120).start()
    yield c
    c.close()


def test_nothing_is_parsed_before_the_token_is_proved(coord, monkeypatch):
    """The old protocol's hello (JSON carrying the right token) is refused without a JSON parse."""
    coord._server.handshake_s = 0.5  # short garbage waits for the rest of the 76-byte response until then
    parsed = []

    class NoJson:
        @staticmethod
        def loads(b):
            parsed.append(b)
            return json.loads(b)
    monkeypatch.setattr(coord_server, "json", NoJson)
    for payload in (encode({"type": "hello", "token": coord.token, "rank": 0, "host": "h", "pid": 1}),
                    b"[]\n", b"[" * 200_000, auth.MAGIC + b"\0" * (auth.RESPONSE_BYTES - len(auth.MAGIC))):
        s = socket.create_connection(("127.0.0.1", coord.port))
        s.sendall(payload)
        assert _closed_by_server(s)
        s.close()
    assert parsed == [] and coord.ranks == {}
    st = coord.server_stats
    assert st["refused"] + st["timed_out"] == 4 and st["authenticated"] == 0


def test_authenticated_but_malformed_input_is_dropped_quietly_and_counted(coord, capfd):
    srv = coord._server
    for payload in (b"[]\n", b"x" * (coord_server.HELLO_BYTES + 10), b"{not json\n",
                    b"[" * 200_000 + b"\n"):
        s = dial("127.0.0.1", coord.port, coord.token, 0)
        s.sendall(payload)
        assert _closed_by_server(s)
        s.close()
    assert _wait(lambda: srv.stats["malformed"] == 4)
    # after a good hello, a line over line_bytes is malformed too (and the rank's link counts as closed)
    srv.line_bytes = 1000
    s = dial("127.0.0.1", coord.port, coord.token, 1)
    s.sendall(encode({"type": "hello", "rank": 1, "host": "h", "pid": 1}) + b"{" + b" " * 2000)
    assert _closed_by_server(s)
    assert _wait(lambda: srv.stats["malformed"] == 5)
    coord.poll(0.2)
    assert 1 in coord.ranks and coord.failure is not None and coord.failure.rank == 1
    assert "Traceback" not in capfd.readouterr().err


def test_32_mb_without_a_newline_is_cut_off_at_the_line_bound_quickly(coord):
    """The old server appended every chunk to a bytes buffer (quadratic: 4 s of CPU for 32 MB); now reading stops
    at line_bytes (4 MB) and the connection is dropped."""
    s = dial("127.0.0.1", coord.port, coord.token, 0)
    s.sendall(encode({"type": "hello", "rank": 0, "host": "h", "pid": 1}))
    t0 = time.monotonic()
    try:
        s.sendall(b"x" * (32 << 20))
    except OSError:
        pass  # reset once the server drops it
    assert _closed_by_server(s)
    assert time.monotonic() - t0 < 5
    assert _wait(lambda: coord.server_stats["malformed"] == 1)
    s.close()


def test_a_connection_speaks_only_for_the_rank_it_proved(coord):
    s = dial("127.0.0.1", coord.port, coord.token, 1)
    s.sendall(encode({"type": "hello", "rank": 0, "host": "h", "pid": 1}))  # claims rank 0 in JSON
    assert _wait(lambda: (coord.poll(0.05), coord.ranks)[1] != {})
    assert list(coord.ranks) == [1]
    s.close()


def test_idle_connections_time_out_and_cost_no_thread(coord):
    """100 idle connections: at most max_pending (64) are kept, the oldest evicted, the rest closed at their
    deadline; no thread per connection."""
    srv = coord._server
    srv.handshake_s = 1.0
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", coord.port)) for _ in range(100)]
    assert _wait(lambda: srv.stats["accepted"] == 100, 5)
    assert srv.connections == srv.max_pending == 64
    assert threading.active_count() == before  # one selector thread for all of them
    t0 = time.monotonic()
    for s in idle:
        assert _closed_by_server(s)
        s.close()
    assert time.monotonic() - t0 < 5
    assert srv.connections == 0 and srv.stats["timed_out"] + srv.stats["evicted"] == 100


def _garbage(port, c, per_client, payloads, big, out):
    """One flooding process: per_client connections, each sending one kind of garbage (or holding still)."""
    held, n = [], 0
    try:
        for i in range(per_client):
            k = c * per_client + i
            payload = big if k % 2500 == 7 else payloads[k % len(payloads)]  # 4 of 32 MB
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                n += 1
                if payload is None:
                    held.append(s)  # idle: left to the server's deadline
                    continue
                s.sendall(payload)
                s.close()
            except OSError:
                pass  # reset by the server mid-send: what it should do
        time.sleep(1.5)  # past the server's 1 s handshake deadline for the held ones
        out.put((c, n, None))
    except BaseException as e:
        out.put((c, n, repr(e)))


def test_survives_10000_garbage_connections_while_a_run_completes(tmp_path, capfd):
    import multiprocessing as mp
    ours = set(threading.enumerate())
    coord = Coordinator(2, ranks_file=tmp_path / "ranks.json", start_timeout=120).start()
    srv = coord._server
    srv.handshake_s = 1.0
    big = b"x" * (32 << 20)  # 32 MB, no newline
    payloads = [b"", b"[]\n", b"[" * 200_000, os.urandom(100),
                encode({"type": "hello", "token": coord.token, "rank": 0, "host": "h", "pid": 1}),
                auth.MAGIC + os.urandom(auth.RESPONSE_BYTES - len(auth.MAGIC)), None]  # None: idle
    n_procs, per_proc = 2, 5000  # 10,000 connections from 2 processes (no GIL shared with the server)

    def rank(r):
        rep = RankReporter(coord.address, coord.token, r, 2, connect_timeout=60)
        for step in range(1, 31):
            rep.progress(step - 1)
            rep.log({"step": step, "loss_sum": 1.0, "count": 1, "step_time": 0.01})
            time.sleep(0.02)
        rep.close()

    rss0 = _rss_mb()
    t0 = time.monotonic()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_garbage, args=(coord.port, c, per_proc, payloads, big, out)) for c in range(n_procs)]
    ranks = [threading.Thread(target=rank, args=(r,), name=f"rank-{r}") for r in range(2)]
    for p in procs[:2]:
        p.start()
    for t in ranks:
        t.start()
    for p in procs[2:]:
        p.start()
    peak_threads, peak_rss = 0, 0.0
    while any(p.is_alive() for p in procs) or not (coord.finished or coord.failure):
        coord.poll(0.05)
        extra = [t for t in threading.enumerate() if t not in ours and not t.name.startswith(("rank-", "ndtrain-rep"))]
        peak_threads = max(peak_threads, len(extra))
        peak_rss = max(peak_rss, _rss_mb())
        assert time.monotonic() - t0 < 120, "flood + run did not finish within 120 s"
    flood_s = time.monotonic() - t0
    results = sorted(out.get(timeout=10) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    for t in ranks:
        t.join(timeout=30)
    assert [e for _, _, e in results if e] == []
    assert sum(n for _, n, _ in results) == 10_000
    assert coord.failure is None and coord.finished
    assert [r["step"] for r in coord.records] == list(range(1, 31))
    assert peak_threads <= 2  # the selector loop (and the queue feeder thread of mp.Queue), whatever the load
    assert peak_rss - rss0 < 100, f"RSS grew by {peak_rss - rss0:.0f} MB"
    # held-open connections are dropped at their deadline; every garbage connection is counted
    assert _wait(lambda: srv.connections == 0, 10), (srv.connections, srv.stats)  # the ranks closed theirs
    st = srv.stats
    assert st["accepted"] >= 10_000 + 2 and st["authenticated"] == 2
    assert st["refused"] + st["timed_out"] + st["evicted"] + st["busy"] + st["malformed"] == st["accepted"] - 2
    coord.close()
    assert "Traceback" not in capfd.readouterr().err
    print(f"10,000 garbage connections + a 30-step run: {flood_s:.1f} s; peak extra threads {peak_threads}; "
          f"RSS +{peak_rss - rss0:.0f} MB; {st}")
