"""The TCP mesh under attack, on 127.0.0.1: only a peer that proves the run's secret (HMAC challenge-response) joins,
nothing is read from a stranger beyond the fixed-size handshake, lengths from peers are checked, silent
connections time out, and the listener binds the address it is given."""
import socket
import struct
import threading
import time

import numpy as np
import pytest

from ndtrain.cluster.comm import auth
from ndtrain.cluster.comm.auth import AuthError, client_handshake, derive_key, server_handshake
from ndtrain.cluster.comm.mesh import PURPOSE
from ndtrain.cluster.comm.tcp import ProtocolError, TcpGroup

KEY = derive_key("the-run-secret", PURPOSE)
WRONG = derive_key("another-secret", PURPOSE)


def _run(fn, *args):
    """fn(*args) in a thread; returns a joiner giving its result or raising its exception."""
    box = {}

    def main():
        try:
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e
    t = threading.Thread(target=main, daemon=True)
    t.start()

    def join(timeout=30):
        t.join(timeout)
        assert not t.is_alive(), f"{fn} still running"
        if "error" in box:
            raise box["error"]
        return box.get("value")
    return join


def _drain(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _pair(**kw):
    return TcpGroup(0, 2, key=KEY, **kw), TcpGroup(1, 2, key=KEY, **kw)


def _connect(a, b):
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    join = _run(b.connect, addrs)
    a.connect(addrs)
    join()


def test_stranger_claiming_a_rank_cannot_inject_into_the_allreduce():
    """The old attack: connect, send struct.pack('<i', 1) and a gradient of 1e30. It must be dropped after the
    challenge (the only bytes it gets), and the real rank 1's all-reduce must be exact."""
    a, b = _pair(timeout=20)
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    try:
        join_a = _run(a.connect, addrs)  # rank 0 waits for rank 1
        stranger = socket.create_connection(("127.0.0.1", a.port))
        stranger.sendall(struct.pack("<i", 1) + np.full(1000, 1e30).tobytes())
        got = _drain(stranger)
        assert len(got) == auth.CHALLENGE_BYTES and got.startswith(auth.MAGIC)  # the challenge, then closed
        stranger.close()
        b.connect(addrs)
        join_a()
        xa, xb = np.arange(1000, dtype=np.float64), np.ones(1000)
        join = _run(b.allreduce, xb)
        a.allreduce(xa)
        join()
        np.testing.assert_array_equal(xa, np.arange(1000) + 1.0)
        np.testing.assert_array_equal(xb, xa)
        assert a.refused == 1
    finally:
        a.close()
        b.close()


def test_peer_with_a_wrong_hmac_is_refused_and_the_real_peer_joins():
    a, b = _pair(timeout=20)
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    try:
        join_a = _run(a.connect, addrs)
        impostor = socket.create_connection(("127.0.0.1", a.port))
        with pytest.raises(AuthError, match="refused"):
            client_handshake(impostor, WRONG, PURPOSE, claim=1, timeout=5)
        impostor.close()
        b.connect(addrs)
        join_a()
        assert set(a.peers) == {1} and set(b.peers) == {0} and a.refused == 1
    finally:
        a.close()
        b.close()


def test_rank_refuses_a_listener_that_does_not_hold_the_secret():
    """Mutual: a rank dialling an impostor's listener (which accepts anything) detects its wrong proof."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def impostor():
        s, _ = srv.accept()
        s.sendall(auth.MAGIC + b"\0" * auth.NONCE_BYTES)
        s.recv(auth.RESPONSE_BYTES)
        s.sendall(b"\1" * auth.MAC_BYTES)
        time.sleep(0.5)
        s.close()
    join = _run(impostor)
    b = TcpGroup(1, 2, key=KEY, timeout=5)
    try:
        with pytest.raises(AuthError, match="rank 0"):
            b.connect([("127.0.0.1", port), ("127.0.0.1", b.port)])
    finally:
        b.close()
        join()
        srv.close()


def test_a_rank_taken_twice_or_out_of_range_is_refused_even_with_the_secret():
    a = TcpGroup(0, 3, key=KEY, timeout=1.5)
    try:
        join_a = _run(a.connect, [("127.0.0.1", a.port), ("127.0.0.1", 1), ("127.0.0.1", 1)])
        first, second, bogus = (socket.create_connection(("127.0.0.1", a.port)) for _ in range(3))
        client_handshake(first, KEY, PURPOSE, claim=1, timeout=5)  # rank 1 taken
        for s, claim in ((second, 1), (bogus, 7)):
            with pytest.raises(AuthError, match="refused"):
                client_handshake(s, KEY, PURPOSE, claim=claim, timeout=5)
        with pytest.raises(TimeoutError, match=r"ranks \[2\] did not connect \(2 connection\(s\) refused"):
            join_a()
        for s in (first, second, bogus):
            s.close()
    finally:
        a.close()


@pytest.mark.parametrize("length", [-5, 2 ** 62, (16 << 20) + 1])
def test_bad_length_from_an_authenticated_peer_is_refused_naming_it(length):
    """Rank 0 receiving an allgather record length out of range raises, naming rank 1, before allocating."""
    a = TcpGroup(0, 2, key=KEY, timeout=10)
    peer = socket.create_connection(("127.0.0.1", a.port))
    join = _run(client_handshake, peer, KEY, PURPOSE, 1, 5)
    try:
        a.connect([("127.0.0.1", a.port), ("127.0.0.1", 1)])
        join()
        peer.sendall(struct.pack("<q", length) + b"x" * 64)
        with pytest.raises(ProtocolError, match=rf"rank 1 sent a message length of {length} bytes"):
            a.allgather_bytes(b"{}")
    finally:
        peer.close()
        a.close()


@pytest.mark.parametrize("length", [-1, 2 ** 62])
def test_bad_reply_length_from_rank_0_is_refused(length):
    """The other direction: a non-root rank checks rank 0's reply length too."""
    srv = socket.create_server(("127.0.0.1", 0))

    def fake_root():
        s, _ = srv.accept()
        server_handshake(s, KEY, PURPOSE, timeout=5)
        s.recv(64)
        s.sendall(struct.pack("<q", length))
        time.sleep(1)
        s.close()
    join = _run(fake_root)
    b = TcpGroup(1, 2, key=KEY, timeout=10)
    try:
        b.connect([srv.getsockname(), ("127.0.0.1", b.port)])
        with pytest.raises(ProtocolError, match=rf"rank 0 sent a message length of {length} bytes"):
            b.allgather_bytes(b"{}")
    finally:
        b.close()
        join()
        srv.close()


def test_idle_and_half_open_connections_time_out_without_delaying_the_real_peer():
    a, b = _pair(timeout=20, handshake_s=0.5)
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    try:
        join_a = _run(a.connect, addrs)
        idle = socket.create_connection(("127.0.0.1", a.port))  # sends nothing
        half = socket.create_connection(("127.0.0.1", a.port))
        half.sendall(auth.MAGIC + b"\0\0")  # the start of a response, then silence
        t0 = time.monotonic()
        b.connect(addrs)  # not blocked by the two silent connections
        join_a()
        assert time.monotonic() - t0 < 5
        for s in (idle, half):
            assert len(_drain(s, timeout=5)) == auth.CHALLENGE_BYTES  # closed by the server after its deadline
            s.close()
    finally:
        a.close()
        b.close()


def test_handshake_deadline_on_a_silent_client():
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    t0 = time.monotonic()
    with pytest.raises(AuthError, match="timed out"):
        server_handshake(s, KEY, PURPOSE, timeout=0.3)
    assert time.monotonic() - t0 < 3
    for x in (c, s, srv):
        x.close()


def test_established_connection_times_out_naming_the_silent_rank():
    a, b = _pair(timeout=0.5)
    try:
        _connect(a, b)
        with pytest.raises(TimeoutError, match="from rank 1"):
            a.allreduce(np.ones(4))
    finally:
        a.close()
        b.close()


def test_listener_binds_the_address_it_is_given_and_loopback_by_default():
    g = TcpGroup(0, 2, key=KEY)
    h = TcpGroup(0, 2, key=KEY, host="127.0.0.1")
    try:
        assert g._listener._sock.getsockname()[0] == "127.0.0.1"
        assert h._listener._sock.getsockname()[0] == "127.0.0.1"
    finally:
        g.close()
        h.close()


def test_mesh_needs_a_secret():
    with pytest.raises(ValueError, match="secret"):
        derive_key("", PURPOSE)
    with pytest.raises(ValueError, match="secret"):
        TcpGroup(0, 2, key=b"")


def test_the_secret_never_goes_over_the_wire():
    """Record both directions of a real handshake: neither the token nor the derived key appears."""
    token = "s3cr3t-token-value-0123456789abcdef"
    key = derive_key(token, PURPOSE)
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    sent = []

    class Tap:
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data):
            sent.append(bytes(data))
            return self.sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self.sock, name)
    join = _run(server_handshake, Tap(s), key, PURPOSE, None, 5)
    client_handshake(Tap(c), key, PURPOSE, claim=3, timeout=5)
    assert join() == 3
    wire = b"".join(sent)
    assert len(wire) == auth.CHALLENGE_BYTES + auth.RESPONSE_BYTES + auth.MAC_BYTES
    assert token.encode() not in wire and key not in wire
    for x in (c, s, srv):
        x.close()


def test_a_flood_of_silent_connections_does_not_keep_the_real_rank_out():
    """More silent connections than MAX_PENDING handshakes: the oldest are cut, the real rank retries and joins long
    before the strangers' handshake deadline (30 s here) would free a slot."""
    from ndtrain.cluster.comm.mesh import MAX_PENDING
    a, b = _pair(timeout=20, handshake_s=30)
    addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    try:
        join_a = _run(a.connect, addrs)
        flood = [socket.create_connection(("127.0.0.1", a.port)) for _ in range(MAX_PENDING + 36)]
        t0 = time.monotonic()
        join_b = _run(b.connect, addrs)
        more = []
        for _ in range(MAX_PENDING):  # still flooding (until rank 0's listener closes: the mesh is complete)
            try:
                more.append(socket.create_connection(("127.0.0.1", a.port)))
            except ConnectionRefusedError:
                break
        join_b()
        join_a()
        assert time.monotonic() - t0 < 5
        assert set(a.peers) == {1}
        for s in flood + more:
            s.close()
    finally:
        a.close()
        b.close()
