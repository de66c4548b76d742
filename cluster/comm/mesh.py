"""An authenticated full mesh of TCP sockets between ranks: the connection set-up, independent of any collective
algorithm (cluster.comm.tcp builds its all-reduce on it; a ring would reuse it as is).

Every pair of ranks holds one socket: rank r connects to every lower rank and accepts every higher one. Each
connection runs the HMAC challenge-response of cluster.comm.auth before it counts: a stranger cannot take a rank,
and is dropped before any byte of payload is read. The listener binds the address the launcher chose (loopback
on one host, the cluster interface's address across hosts), never 0.0.0.0 by default. Handshakes run in their own
threads with a deadline each, so a peer that connects and stays silent (idle or half-open) delays nobody and is
dropped when its deadline passes; at most MAX_PENDING handshakes run at once (a new one ends the oldest, and a
rank whose handshake was cut retries until the deadline).
Established sockets keep a timeout on every read and TCP keepalive, so a peer that vanished is noticed.

    listener = MeshListener(rank, world_size, host="127.0.0.1")       # port: listener.port
    peers = listener.connect(addrs, key, timeout=60)                   # {rank: socket}; addrs[r] = (ip, port)
"""
from __future__ import annotations

import queue
import socket
import threading
import time

from .auth import AuthError, BadProof, client_handshake, server_handshake

PURPOSE = b"mesh"
HANDSHAKE_S = 10.0  # one connection's handshake deadline
MAX_PENDING = 64  # concurrent handshakes on one listener


def enable_keepalive(s: socket.socket, idle_s: int = 30, interval_s: int = 10, count: int = 3) -> None:
    """Probe an idle connection so a peer whose host vanished (half-open) is noticed within ~a minute."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class MeshListener:
    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", handshake_s: float = HANDSHAKE_S):
        self.rank, self.world_size, self.host = rank, world_size, host
        self.handshake_s = handshake_s
        self.refused = 0  # connections dropped: wrong secret, bad framing, timed out, unexpected rank
        self.refusals: list[str] = []  # their reasons (the first few), for error messages
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(128)  # a burst of connections waits in the kernel instead of having its SYNs dropped
        self.port = self._sock.getsockname()[1]

    def connect(self, addrs: list[tuple[str, int]], key: bytes, timeout: float = 60.0) -> dict[int, socket.socket]:
        """Connect to the lower ranks, accept the higher ones; returns {peer rank: socket} (timeout set, Nagle off,
        keepalive on). Raises TimeoutError naming the ranks that did not connect, AuthError when a lower rank's
        listener does not prove the secret."""
        deadline = time.monotonic() + timeout
        peers: dict[int, socket.socket] = {}
        try:
            for r in range(self.rank):
                peers[r] = self._dial(r, addrs[r], key, deadline)
            peers.update(self._accept(key, deadline))
        except BaseException:
            for s in peers.values():
                s.close()
            raise
        finally:
            self.close()
        for s in peers.values():
            s.settimeout(timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(s)
        return peers

    def _dial(self, r: int, addr: tuple[str, int], key: bytes, deadline: float) -> socket.socket:
        """Connect to rank r's listener and run the handshake, retrying until the deadline (its listener may not
        be up yet, or may have dropped us while busy with a flood of strangers)."""
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rank {self.rank}: cannot connect to rank {r} at {addr[0]}:{addr[1]}: {last}")
            try:
                s = socket.create_connection(tuple(addr), timeout=min(left, self.handshake_s))
            except OSError as e:
                last = str(e)
                time.sleep(0.1)
                continue
            try:
                client_handshake(s, key, PURPOSE, claim=self.rank, timeout=min(left, self.handshake_s))
                return s
            except BadProof as e:
                s.close()
                raise BadProof(f"rank {self.rank}: the listener at {addr[0]}:{addr[1]} (rank {r}'s address) failed "
                               f"the handshake: {e}") from None
            except (AuthError, OSError) as e:
                s.close()
                last = f"the handshake failed: {e}"
                time.sleep(0.1)

    def _accept(self, key: bytes, deadline: float) -> dict[int, socket.socket]:
        expected = set(range(self.rank + 1, self.world_size))
        claimed: set[int] = set()
        lock = threading.Lock()
        done: queue.Queue = queue.Queue()
        pending: dict[socket.socket, float] = {}  # handshakes in progress -> when they started

        def claim(r: int) -> bool:
            with lock:
                if r in expected and r not in claimed:
                    claimed.add(r)
                    return True
                return False

        def handshake(s: socket.socket) -> None:
            try:
                r = server_handshake(s, key, PURPOSE, accept=claim, timeout=self.handshake_s)
                done.put((r, s))
            except (AuthError, OSError) as e:
                s.close()
                done.put((None, str(e)))
            finally:
                with lock:
                    pending.pop(s, None)

        peers: dict[int, socket.socket] = {}
        self._sock.settimeout(0.1)
        try:
            while len(peers) < len(expected):
                while True:  # results of finished handshakes
                    try:
                        r, s = done.get_nowait()
                    except queue.Empty:
                        break
                    if r is None:
                        self._refuse(s)
                    else:
                        peers[r] = s
                if len(peers) == len(expected):
                    break
                if time.monotonic() > deadline:
                    missing = sorted(expected - set(peers))
                    why = f" ({self.refused} connection(s) refused: {self.refusals[0]})" if self.refused else ""
                    raise TimeoutError(f"rank {self.rank}: ranks {missing} did not connect{why}")
                try:
                    s, _ = self._sock.accept()
                except socket.timeout:
                    continue
                with lock:
                    if len(pending) >= MAX_PENDING:  # a flood: the oldest handshake makes room (its thread ends)
                        oldest = min(pending, key=pending.get)
                        try:
                            oldest.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    pending[s] = time.monotonic()
                threading.Thread(target=handshake, args=(s,), name="ndtrain-mesh-handshake", daemon=True).start()
        except BaseException:
            for s in peers.values():
                s.close()
            raise
        return peers

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        if len(self.refusals) < 8:
            self.refusals.append(reason)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
