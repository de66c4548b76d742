"""Ring all-reduce over "send to next / receive from previous" links (Patarasuk & Yuan 2009; Baidu's ring).

Written against two duck-typed links, so the same code runs over authenticated TCP sockets between hosts and over
socketpairs in tests:
    send_link.send(view)         send every byte of a memoryview to rank (r + 1) % W
    recv_link.recv_into(view)    fill a memoryview with bytes from rank (r - 1) % W
(For W = 2 both may be one full-duplex socket.) Sends go through a sender thread while this thread receives and
adds, so every host's uplink and downlink are busy at once (the star through rank 0 used one direction at a time).

Two schedules, both bandwidth-optimal for large buffers and both giving bitwise identical results on every rank
(each element's sum is computed on one rank only and then copied around):
  ring           reduce-scatter then all-gather, W chunks: each rank sends 2 (W-1)/W x N bytes. Chunk c is summed
                 in the rotated order x_c + x_{c+1} + ... + x_{c-1}.
  deterministic  a pipelined chain: piece by piece, rank 0 sends its data to rank 1, rank r adds its own to the
                 partial sum it received and passes it on, rank W-1 holds ((x_0 + x_1) + x_2) + ... + x_{W-1}, the
                 rank-ordered sum (bitwise the star's and the shared-memory path's result) and sends it round the ring
                 W-1 -> 0 -> 1 -> ... -> W-2. Each rank sends ~2N bytes (W=2: N, as the ring). Use it when results
                 must be bitwise equal across transports; for W=2 both schedules give the rank-ordered sum.
Buffers are cut into pieces of `piece_bytes`, so adding piece k overlaps receiving piece k+1 and the next hop starts
before the whole chunk has arrived.

A sent buffer is never written before the bytes have reached the next rank: a slot is overwritten only by a value
that could not exist before the next rank had received what this rank sent from it.

All-gather (allgather, allgather_rows; iallgather queued on the transport thread): each rank sends its row to rank
r+1 and forwards what it receives, W-1 hops, no arithmetic (the TCP mesh's allgather_bytes and compressed payloads).

`iallreduce` runs all-reduces in order on a background transport thread (handle.wait() for the result), so buckets
move while backward runs: NumPy additions and socket calls release the GIL.
"""
from __future__ import annotations

import queue
import socket
import threading
import time

import numpy as np

from .base import Handle
from .counters import CommCounters

DEFAULT_PIECE_BYTES = 256 << 10
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)


# -- links -------------------------------------------------------------------------------------------------------------
class SocketLink:
    """A connected stream socket to one peer rank. Every call has the socket's timeout, which counts time without
    progress (each recv/send that moves bytes restarts it): a slow link that is moving never times out."""

    def __init__(self, sock: socket.socket, rank: int, peer: int, timeout: float = 60.0):
        self.sock, self.rank, self.peer, self.timeout = sock, rank, peer, float(timeout)
        sock.settimeout(self.timeout)

    def send(self, view: memoryview) -> None:
        try:
            self.sock.sendall(view)
        except socket.timeout:
            raise TimeoutError(f"rank {self.rank}: rank {self.peer} took no data for {self.timeout:.0f} s; "
                               f"rank {self.peer} is stuck or dead") from None
        except OSError as e:
            raise ConnectionError(f"rank {self.rank}: cannot send to rank {self.peer}: {e}") from None

    def recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise TimeoutError(f"rank {self.rank}: no data from rank {self.peer} for {self.timeout:.0f} s; "
                                   f"rank {self.peer} is stuck or dead") from None
            if k == 0:
                raise ConnectionError(f"rank {self.rank}: rank {self.peer} closed its connection")
            got += k


def tune_socket(sock: socket.socket, bdp_bytes: int = 0, congestion: str | None = "bbr") -> dict:
    """TCP_NODELAY (pieces must not wait for Nagle); buffers for the bandwidth-delay product; a congestion control.

    Buffers: Linux autotunes them up to net.ipv4.tcp_{r,w}mem's maximum (6 MB / 4 MB by default), and setting
    SO_RCVBUF switches autotuning off (and is capped at net.core.rmem_max, 208 KB by default, without privileges).
    So an explicit size is set only when 2 x BDP exceeds what autotuning can reach. Congestion: BBR where the kernel
    has it (on a lossy Wi-Fi link cubic reached 56 of 200 Mbit/s and BBR 189, docs/network.md); ignored where not.
    Returns what the socket ended with."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if congestion:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, congestion.encode())
            except OSError:
                pass
    want = 2 * int(bdp_bytes)
    for opt, force, name in ((socket.SO_SNDBUF, 32, "wmem"), (socket.SO_RCVBUF, 33, "rmem")):
        if want > autotune_max(name):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, want)  # SO_{SND,RCV}BUFFORCE: beyond rmem_max (root)
            except OSError:
                if core_max(name) >= autotune_max(name):  # else the unprivileged cap would shrink the buffer
                    sock.setsockopt(socket.SOL_SOCKET, opt, want)
    out = {"sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
           "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        out["nodelay"] = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        try:
            out["congestion"] = sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).rstrip(b"\0").decode()
        except OSError:
            out["congestion"] = None
    return out


def autotune_max(name: str) -> int:
    """The largest buffer TCP autotuning grows to (the third field of net.ipv4.tcp_rmem / tcp_wmem)."""
    try:
        with open(f"/proc/sys/net/ipv4/tcp_{name}") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


def core_max(name: str) -> int:
    """The largest buffer an unprivileged SO_SNDBUF / SO_RCVBUF may set (net.core.wmem_max / rmem_max)."""
    try:
        with open(f"/proc/sys/net/core/{name}_max") as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 208 << 10


# -- the sender thread -------------------------------------------------------------------------------------------------
class _Sender:
    """Sends queued views in order on its own thread; flush() waits until all are sent and raises its error."""

    def __init__(self, link, rank: int, counters: CommCounters):
        self.link, self.rank, self.counters = link, rank, counters
        self._q: queue.Queue = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ring-send-r{rank}", daemon=True)
        self._thread.start()

    def put(self, view: memoryview) -> None:
        if self.error is not None:
            raise self.error
        with self._cv:
            self._pending += 1
        self._q.put(view)

    def _run(self) -> None:
        while True:
            view = self._q.get()
            if view is None:
                return
            if self.error is None:
                try:
                    self.link.send(view)
                    self.counters.add(sent=len(view))
                except BaseException as e:  # reported by flush() on the caller's thread
                    self.error = e
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    def flush(self, timeout: float) -> None:
        """Every send's own timeout bounds this wait; `timeout` is a backstop should the link have none."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {self.rank}: ring sends did not finish within {timeout:.0f} s")
                self._cv.wait(min(left, 1.0))
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)


# -- the all-reduce ------------------------------------------------------------------------------------------------------
class RingHandle(Handle):
    def __init__(self, counters: CommCounters):
        self.value = None  # what wait() returns (an all-gather's rows)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._counters = counters

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Until the all-reduce is over (the transport's links time out without progress, so this ends)."""
        t0 = time.perf_counter()
        while not self._done.wait(1.0):
            pass
        self._counters.add(blocked_s=time.perf_counter() - t0)
        if self._error is not None:
            raise self._error
        return self.value


class RingAllreduce:
    """rank, world_size; send_link to rank (r+1) % W, recv_link from rank (r-1) % W (see the module docstring);
    deterministic: the rank-ordered chain schedule; piece_bytes: pipelining granularity; timeout: the backstop of
    waits that have no link timeout of their own."""

    def __init__(self, rank: int, world_size: int, send_link, recv_link, deterministic: bool = False,
                 piece_bytes: int = DEFAULT_PIECE_BYTES, counters: CommCounters | None = None,
                 timeout: float = 600.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.rank, self.world_size, self.deterministic = rank, world_size, bool(deterministic)
        self.piece_bytes = max(64, int(piece_bytes))
        self.recv_link, self.timeout = recv_link, float(timeout)
        self.counters = counters if counters is not None else CommCounters()
        self._sender = _Sender(send_link, rank, self.counters) if world_size > 1 else None
        self._tmp = np.empty(0, np.uint8)
        self._jobs: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._last: RingHandle | None = None  # the last queued iallreduce (jobs run in order)
        self._lock = threading.Lock()  # one all-reduce at a time on the links

    # -- blocking ----------------------------------------------------------------------------------------------------
    def allreduce(self, flat: np.ndarray) -> None:
        """Sum the (N,) C-contiguous array over ranks, in place (after every all-reduce queued before it)."""
        with self.counters.blocking():
            self.drain()
            self._allreduce(flat)

    def drain(self) -> None:
        """Wait until every queued iallreduce is over: every rank must see the links' byte streams in the same
        order, so anything else on these sockets (a blocking all-reduce, another collective of the mesh) starts
        after them. Raises the error of a failed one."""
        h = self._last
        if h is not None:
            while not h._done.wait(1.0):
                pass
            self._last = None
            if h._error is not None:
                raise h._error

    def _allreduce(self, flat: np.ndarray) -> None:
        if flat.ndim != 1 or not flat.flags.c_contiguous:
            raise ValueError(f"rank {self.rank}: ring all-reduce needs a 1-D C-contiguous array")
        self.counters.add(payload=flat.nbytes, collectives=1)
        if self.world_size == 1 or flat.size == 0:
            return
        with self._lock:
            if self._tmp.nbytes < self.piece_bytes + flat.itemsize:
                self._tmp = np.empty(self.piece_bytes + flat.itemsize, np.uint8)
            per = max(1, self.piece_bytes // flat.itemsize)
            if self.deterministic:
                self._chain(flat, per)
            else:
                self._ring(flat, per)
            self._sender.flush(self.timeout)

    def _send(self, piece: np.ndarray) -> None:
        self._sender.put(memoryview(piece).cast("B"))

    def _recv(self, piece: np.ndarray) -> None:
        view = memoryview(piece).cast("B")
        self.recv_link.recv_into(view)
        self.counters.add(received=len(view))

    def _recv_add(self, piece: np.ndarray) -> None:
        """piece = (partial sum received) + piece: the earlier ranks' sum first, then this rank's term."""
        tmp = self._tmp[:piece.nbytes].view(piece.dtype)
        self._recv(tmp)
        np.add(tmp, piece, out=piece)

    def _ring(self, flat: np.ndarray, per: int) -> None:
        W, r = self.world_size, self.rank
        bounds = [flat.size * i // W for i in range(W + 1)]

        def pieces(c: int):
            lo, hi = bounds[c], bounds[c + 1]
            return [flat[i:min(hi, i + per)] for i in range(lo, hi, per)]

        for p in pieces(r):                      # reduce-scatter, step 0: my own chunk r
            self._send(p)
        for s in range(W - 1):                   # step s: receive chunk r-s-1, add mine, pass it on; after the last
            for p in pieces((r - s - 1) % W):    # step chunk r+1 is complete here and its pieces start the all-gather
                self._recv_add(p)
                self._send(p)
        for t in range(W - 1):                   # all-gather, step t: receive complete chunk r-t, pass it on
            for p in pieces((r - t) % W):
                self._recv(p)
                if t < W - 2:
                    self._send(p)

    def _chain(self, flat: np.ndarray, per: int) -> None:
        W, r = self.world_size, self.rank
        pieces = [flat[i:i + per] for i in range(0, flat.size, per)]
        for p in pieces:                         # reduce along 0 -> 1 -> ... -> W-1
            if r == 0:
                self._send(p)
            else:
                self._recv_add(p)
                self._send(p)                    # rank W-1 sends the final sum on to rank 0
        if r != W - 1:
            for p in pieces:                     # the final sums along W-1 -> 0 -> ... -> W-2
                self._recv(p)
                if r < W - 2:
                    self._send(p)

    # -- all-gather ----------------------------------------------------------------------------------------------------
    def allgather(self, mine: np.ndarray) -> np.ndarray:
        """(N,) array, the same size and dtype on every rank -> (W, N), row r = rank r's array, bitwise (after every
        all-reduce queued before it)."""
        with self.counters.blocking():
            self.drain()
            return self._allgather_array(mine)

    def allgather_rows(self, rows: list) -> None:
        """rows: W contiguous uint8 arrays, rows[rank] holding this rank's bytes and the others allocated to their
        (known) lengths; fills the others in place."""
        with self.counters.blocking():
            self.drain()
            self._allgather_rows(rows)

    def _allgather_array(self, mine: np.ndarray) -> np.ndarray:
        mine = np.ascontiguousarray(mine).reshape(-1)
        out = np.empty((self.world_size, mine.size), dtype=mine.dtype)
        out[self.rank] = mine
        self._allgather_rows([row.view(np.uint8) for row in out])
        return out

    def _allgather_rows(self, rows: list) -> None:
        """The ring all-gather: each rank sends its row to rank r+1, then forwards what it received from rank r-1,
        W-1 hops in all; in pieces, through the sender thread, so a host's uplink and downlink are busy at once.
        Every rank sends (W-1)/W of the total and receives as much (a star through rank 0 moved (W-1) rows each way
        on rank 0's link). No arithmetic: each row arrives bitwise."""
        W, r = self.world_size, self.rank
        self.counters.add(payload=int(rows[r].nbytes), collectives=1)
        if W == 1:
            return
        per = self.piece_bytes

        def pieces(row):
            return [row[i:i + per] for i in range(0, row.size, per)]

        with self._lock:
            for p in pieces(rows[r]):
                self._send(p)
            for s in range(W - 1):                   # hop s: the row of rank r-s-1 arrives from rank r-1
                for p in pieces(rows[(r - s - 1) % W]):
                    self._recv(p)
                    if s < W - 2:
                        self._send(p)
            self._sender.flush(self.timeout)

    # -- non-blocking ------------------------------------------------------------------------------------------------
    def iallreduce(self, flat: np.ndarray) -> RingHandle:
        """Queue an in-place all-reduce on the transport thread (in call order: every rank must start the same
        all-reduces in the same order); the result is in `flat` after handle.wait(). Do not touch `flat` until then."""
        return self._queue(lambda: self._allreduce(flat))

    def iallgather(self, mine: np.ndarray) -> RingHandle:
        """Queue allgather(mine) on the transport thread, in call order with the all-reduces; handle.wait() returns
        the (W, N) rows."""
        mine = np.array(mine, copy=True).reshape(-1)
        out = np.empty((self.world_size, mine.size), dtype=mine.dtype)
        out[self.rank] = mine
        h = self._queue(lambda: self._allgather_rows([row.view(np.uint8) for row in out]))
        h.value = out
        return h

    def _queue(self, job) -> RingHandle:
        if self._worker is None:
            self._jobs = queue.Queue()
            self._worker = threading.Thread(target=self._transport, name=f"ring-transport-r{self.rank}",
                                            daemon=True)
            self._worker.start()
        h = RingHandle(self.counters)
        self._jobs.put((job, h))
        self._last = h
        return h

    def _transport(self) -> None:
        failed: BaseException | None = None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, h = job
            if failed is not None:  # the links are in an unknown state after an error: fail what follows too
                h._finish(failed)
                continue
            try:
                fn()
                h._finish(None)
            except BaseException as e:
                failed = e
                h._finish(e)

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=5)
            self._worker = None
        if self._sender is not None:
            self._sender.close()


def ring_over_peers(rank: int, world_size: int, peers: dict, timeout: float = 60.0, deterministic: bool = False,
                    piece_bytes: int = DEFAULT_PIECE_BYTES, bdp_bytes: int = 0,
                    counters: CommCounters | None = None) -> RingAllreduce:
    """A ring over an existing mesh of connected stream sockets (peers[r]: the socket to rank r, as TcpGroup holds
    them), tuned by tune_socket. The ring then owns its two neighbours' sockets while an all-reduce is in flight:
    the mesh's other collectives must not run on them at the same time (the byte streams would interleave)."""
    if world_size == 1:
        return RingAllreduce(0, 1, None, None, counters=counters)
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    for r in {nxt, prv}:
        tune_socket(peers[r], bdp_bytes)
    return RingAllreduce(rank, world_size, SocketLink(peers[nxt], rank, nxt, timeout),
                         SocketLink(peers[prv], rank, prv, timeout), deterministic=deterministic,
                         piece_bytes=piece_bytes, counters=counters, timeout=timeout)


def socketpair_ring(world_size: int, timeout: float = 30.0) -> list[tuple[SocketLink, SocketLink]]:
    """(send_link, recv_link) per rank over local socketpairs (tests, and the same code path as TCP)."""
    pairs = [socket.socketpair() for _ in range(world_size)]  # pair r carries rank r -> rank r+1
    return [(SocketLink(pairs[r][0], r, (r + 1) % world_size, timeout),
             SocketLink(pairs[(r - 1) % world_size][1], r, (r - 1) % world_size, timeout))
            for r in range(world_size)]


__all__ = ["RingAllreduce", "RingHandle", "SocketLink", "ring_over_peers", "socketpair_ring", "tune_socket", "autotune_max",
           "DEFAULT_PIECE_BYTES"]
