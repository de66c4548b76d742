"""The coordinator's socket server: who may talk to it, and how much they may send. (What it does with the
messages, and when the job has failed, is cluster.coordinator.)

One thread runs a selector loop over every connection, so an attacker's connections cost file descriptors and a
few bytes each, never threads. A connection goes through:
  1. auth: the HMAC challenge-response of cluster.comm.auth with a key derived from the run's token (purpose
     b"coord"); the claim is the rank. Exactly RESPONSE_BYTES are read, within `handshake_s`; no JSON is parsed
     before the proof checks out. At most `max_pending` connections are in this state: a new one evicts the oldest.
  2. hello: one JSON line of at most `hello_bytes`, within `handshake_s`.
  3. messages: JSON lines of at most `line_bytes` each; a connection silent for `idle_s` is closed.
Replies (the only bytes it sends after the handshake, each a JSON line): {"type": "ack"} to every heartbeat, and
{"type": "stop"} to every rank once `stop` is set (the driver got Ctrl-C or SIGTERM: cluster/interrupt.py), ranks
that say hello later included. They are queued per connection and sent by the loop, so a rank that does not read
never blocks it.
Anything else (a wrong proof, bad framing, an overlong line, JSON that is not an object, a deadline passed) closes
the connection quietly and counts it in `stats` (no traceback on the terminal). Each message delivered carries the
authenticated rank (a connection cannot speak for another rank) and the generation its handshake used; a closed
connection of an authenticated rank delivers {"type": "eof"}. Lines are split from a bytearray scanned once (no
quadratic `buf += chunk`).

    srv = CoordServer("127.0.0.1", 0, credentials=lambda: (key, generation), deliver=inbox.put, world_size=2)
    srv.start(); ...; srv.close()

The rank side: `dial(host, port, token, rank, timeout)` returns an authenticated socket to write JSON lines to.
"""
from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from typing import Callable

from .comm.auth import RESPONSE_BYTES, AuthError, challenge, check_response, client_handshake, derive_key

PURPOSE = b"coord"
REPLY_ACK, REPLY_STOP = b'{"type":"ack"}\n', b'{"type":"stop"}\n'
HELLO_BYTES = 4096
LINE_BYTES = 4 << 20  # a rank's error message carries its traceback; summaries are a few KB


def coord_key(token: str) -> bytes:
    return derive_key(token, PURPOSE)


def dial(host: str, port: int, token: str, rank: int, timeout: float = 30.0) -> socket.socket:
    """Connect to the coordinator and prove the run's token (retrying until `timeout`: it may still be starting,
    or busy refusing a flood). ConnectionError naming the address when it cannot."""
    key = coord_key(token)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((host, port), timeout=5.0)
            try:
                client_handshake(s, key, PURPOSE, claim=rank, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            except BaseException:
                s.close()
                raise
            return s
        except OSError as e:  # AuthError is a ConnectionError
            if time.monotonic() > deadline:
                why = "it refused the run's token" if isinstance(e, AuthError) else str(e)
                raise ConnectionError(f"rank {rank}: cannot reach the coordinator at {host}:{port}: {why}") from None
            time.sleep(0.2)


class _Conn:
    __slots__ = ("sock", "fd", "state", "deadline", "buf", "scan", "nonce", "key", "gen", "rank", "t_open", "out",
                 "told_stop")

    def __init__(self, sock, nonce, key, gen, deadline):
        self.sock, self.fd, self.nonce, self.key, self.gen = sock, sock.fileno(), nonce, key, gen
        self.state, self.deadline, self.rank = "auth", deadline, None
        self.buf, self.scan = bytearray(), 0
        self.t_open = time.monotonic()
        self.out, self.told_stop = bytearray(), False  # replies not sent yet; "stop" queued


class CoordServer:
    def __init__(self, host: str, port: int, credentials: Callable[[], tuple[bytes, int]],
                 deliver: Callable[[dict], None], world_size: int, handshake_s: float = 5.0, idle_s: float = 120.0,
                 max_pending: int = 64, max_conns: int | None = None, hello_bytes: int = HELLO_BYTES,
                 line_bytes: int = LINE_BYTES):
        self.host, self.port = host, port
        self.credentials, self.deliver, self.world_size = credentials, deliver, world_size
        self.handshake_s, self.idle_s = handshake_s, idle_s
        self.max_pending = max_pending
        self.max_conns = max_conns if max_conns is not None else max_pending + 4 * world_size + 8
        self.hello_bytes, self.line_bytes = hello_bytes, line_bytes
        # refused: failed the handshake; malformed: bad framing / JSON after it; timed_out: a deadline passed;
        # evicted: pending handshakes pushed out by newer ones; busy: refused at the connection limit
        self.stats = {"accepted": 0, "authenticated": 0, "refused": 0, "malformed": 0, "timed_out": 0,
                      "evicted": 0, "busy": 0}
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._srv: socket.socket | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stop = False  # set by the coordinator: every rank is told to stop (the loop sends it)

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, self.port))
        srv.listen(1024)  # a burst of connections waits in the kernel instead of having its SYNs dropped
        srv.setblocking(False)
        self.port = srv.getsockname()[1]
        self._srv = srv
        self._sel.register(srv, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="ndtrain-coord-server", daemon=True)
        self._thread.start()
        return self.port

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed:
                for key, _ in self._sel.select(timeout=0.1):
                    if key.data is None:
                        self._accept()
                    elif key.data.state != "closed":  # (dropped earlier in this batch: its fd may be reused)
                        self._readable(key.data)
                self._sweep()
                self._replies()
        finally:
            for c in list(self._conns.values()):
                self._drop(c, None)
            self._sel.unregister(self._srv)
            self._srv.close()
            self._sel.close()

    def _accept(self) -> None:
        for _ in range(256):  # a burst, then back to the other connections
            try:
                sock, _ = self._srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors: let the backlog wait
                return
            self.stats["accepted"] += 1
            if len(self._conns) >= self.max_conns:
                self.stats["busy"] += 1
                sock.close()
                continue
            pending = [c for c in self._conns.values() if c.state == "auth"]
            if len(pending) >= self.max_pending:
                self.stats["evicted"] += 1
                self._drop(min(pending, key=lambda c: c.t_open), None)
            sock.setblocking(False)
            key, gen = self.credentials()
            hello, nonce = challenge()
            try:
                sent = sock.send(hello)
            except OSError:
                sent = 0
            if sent != len(hello):
                self.stats["refused"] += 1
                sock.close()
                continue
            c = _Conn(sock, nonce, key, gen, time.monotonic() + self.handshake_s)
            self._conns[c.fd] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _readable(self, c: _Conn) -> None:
        want = RESPONSE_BYTES - len(c.buf) if c.state == "auth" else 1 << 16
        try:
            chunk = c.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(c, "refused" if c.state == "auth" else None)
            return
        c.buf += chunk
        if c.state == "auth":
            if len(c.buf) < RESPONSE_BYTES:
                return
            try:
                c.rank, proof = check_response(c.key, PURPOSE, c.nonce, bytes(c.buf),
                                               accept=lambda r: r < self.world_size)
                if c.sock.send(proof) != len(proof):
                    raise OSError("short send")
            except (AuthError, OSError):
                self._drop(c, "refused")
                return
            self.stats["authenticated"] += 1
            c.state, c.buf, c.scan = "hello", bytearray(), 0
            c.deadline = time.monotonic() + self.handshake_s
            return
        if c.state == "messages":
            c.deadline = time.monotonic() + self.idle_s
        self._lines(c)

    def _lines(self, c: _Conn) -> None:
        while True:
            i = c.buf.find(b"\n", c.scan)
            limit = self.hello_bytes if c.state == "hello" else self.line_bytes
            if i < 0:
                if len(c.buf) > limit:
                    self._drop(c, "malformed")
                else:
                    c.scan = len(c.buf)  # the next search starts where this one ended
                return
            if i > limit:
                self._drop(c, "malformed")
                return
            line = bytes(c.buf[:i])
            del c.buf[:i + 1]
            c.scan = 0
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict) or (c.state == "hello" and msg.get("type") != "hello"):
                self._drop(c, "malformed")
                return
            if c.state == "hello":
                c.state, c.deadline = "messages", time.monotonic() + self.idle_s
            msg["rank"], msg["_gen"] = c.rank, c.gen
            if msg.get("type") == "hb":
                c.out += REPLY_ACK
            self.deliver(msg)

    def _replies(self) -> None:
        """Queue "stop" for every rank once asked, and send what is queued as far as each socket takes it."""
        for c in list(self._conns.values()):
            if c.state != "messages":
                continue
            if self.stop and not c.told_stop:
                c.out += REPLY_STOP
                c.told_stop = True
            if c.out:
                try:
                    del c.out[:c.sock.send(c.out)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._drop(c, None)
                    continue
                if len(c.out) > 1 << 16:  # a rank that reads nothing: it stays silent until the idle deadline
                    c.out.clear()

    def _sweep(self) -> None:
        now = time.monotonic()
        for c in [c for c in self._conns.values() if now > c.deadline]:
            self._drop(c, "timed_out")

    def _drop(self, c: _Conn, counter: str | None) -> None:
        if c.state == "closed":
            return
        if counter is not None:
            self.stats[counter] += 1
        if self._conns.get(c.fd) is c:
            del self._conns[c.fd]
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        was, c.state = c.state, "closed"
        if was == "messages":  # a rank's link closed (crash, or malformed data from a broken rank)
            self.deliver({"type": "eof", "rank": c.rank, "_gen": c.gen})
