"""TCP collectives between ranks on different machines (the Ray backend across nodes).

The connections come from cluster.comm.mesh: one socket per pair of ranks, each authenticated by an HMAC
challenge-response on the run's secret before it carries a byte of payload, the listener bound to the address the
launcher chose (never 0.0.0.0 unless asked). This file is only the collective algorithms on those sockets.

All-reduce runs on the ring of cluster.comm.ring over the mesh's neighbour sockets, in its deterministic schedule: a
pipelined chain 0 -> 1 -> ... -> W-1 in pieces, each rank adding its term to the partial sum it received, so every
element is summed in rank order 0..W-1 (the order of the shared-memory path and of the star through rank 0 this
replaced: results stay bit-identical across transports), then the sums passed on round the ring. Pieces move both
ways at once (a sender thread), each rank sends ~2N bytes whatever W (the star: rank 0 sent and received (W-1) N, one
direction at a time), and the sockets get TCP_NODELAY and BBR where the kernel has it (ring.tune_socket). On a
shaped 200 Mbit/s link a 4 MB all-reduce took 0.40 s as a star and 0.18 s as a ring (docs/network.md). Every socket
has a timeout without progress; a stalled peer raises an error naming the rank. iallreduce queues the all-reduce on
the ring's transport thread (overlaps_compute: buckets move while backward runs); the mesh's other collectives
first wait for the queued ones, so the sockets carry the same byte order on every rank. allgather_bytes (every
allgather_obj record) and allgather_array / iallgather_array go round the ring too (W-1 hops; the star through rank 0
they replaced is kept as _allgather_bytes_star). tune_link sizes the ring's buffers to the measured link's
bandwidth-delay product (called by cluster/link_probe.py). `counters` (counters.CommCounters)
holds the bytes sent and received on the sockets and the time blocked in collectives. Nothing a peer sends decides how
much memory is taken: all-reduce and broadcast read exactly the caller's buffer, and the length prefixes of
allgather_bytes are checked against `max_gather_bytes` before anything is allocated.

    g = TcpGroup(rank, W, key=derive_key(token, b"mesh"), host="10.0.0.5")    # listening at (host, g.port)
    g.connect([(ip_0, port_0), ..., (ip_W-1, port_W-1)])
"""
from __future__ import annotations

import struct
import time

import numpy as np

from .counters import CommCounters
from .mesh import HANDSHAKE_S, MeshListener
from .ring import DEFAULT_PIECE_BYTES as RING_PIECE_BYTES
from .ring import ring_over_peers, tune_socket

DEFAULT_PIECE_BYTES = 4 << 20
MAX_GATHER_BYTES = 16 << 20  # one rank's allgather record (small JSON: hashes, checksums, metric sums)


class ProtocolError(ConnectionError):
    """A peer sent something the protocol does not allow (a length out of range)."""


class TcpGroup:
    def __init__(self, rank: int, world_size: int, key: bytes, host: str = "127.0.0.1", timeout: float = 60.0,
                 piece_bytes: int = DEFAULT_PIECE_BYTES, max_gather_bytes: int = MAX_GATHER_BYTES,
                 handshake_s: float = HANDSHAKE_S):
        if not key:
            raise ValueError(f"rank {rank}: the TCP mesh needs the run's secret (key)")
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.piece_bytes, self.max_gather_bytes = piece_bytes, max_gather_bytes
        self._key = key
        self._listener = MeshListener(rank, world_size, host, handshake_s=handshake_s)
        self.port = self._listener.port
        self.peers: dict = {}
        self.counters = CommCounters()
        self._ring = None
        self.bdp_bytes = 0  # the bandwidth-delay product the buffers were sized for (tune_link)

    @property
    def refused(self) -> int:
        """Connections the listener dropped (no or wrong secret, bad framing, timed out, unexpected rank)."""
        return self._listener.refused

    def connect(self, addrs: list[tuple[str, int]]) -> None:
        """addrs[r] = (ip, port) of rank r's listener. Connect to lower ranks, accept the higher ones."""
        self.peers = self._listener.connect(addrs, self._key, timeout=self.timeout)
        # pipelining wants pieces far below the 4 MB the star used: the next hop starts after one piece
        self._ring = ring_over_peers(self.rank, self.world_size, self.peers, timeout=self.timeout,
                                     deterministic=True, piece_bytes=min(self.piece_bytes, RING_PIECE_BYTES),
                                     counters=self.counters)

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _recv_exact(self, peer: int, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(peer, memoryview(buf))
        return bytes(buf)

    def _recv_into(self, peer: int, view: memoryview) -> None:
        s = self.peers[peer]
        got = 0
        while got < len(view):
            try:
                k = s.recv_into(view[got:])
            except TimeoutError:  # socket.timeout
                raise TimeoutError(f"rank {self.rank}: waited {self.timeout:.0f} s for data from rank {peer}; "
                                   f"rank {peer} is stuck or dead") from None
            except OSError as e:
                raise ConnectionError(f"rank {self.rank}: connection to rank {peer} failed: {e}") from None
            if k == 0:
                raise ConnectionError(f"rank {self.rank}: rank {peer} closed its connection")
            got += k
        self.counters.add(received=got)

    def _recv_length(self, peer: int, limit: int) -> int:
        (n,) = struct.unpack("<q", self._recv_exact(peer, 8))
        if not 0 <= n <= limit:
            raise ProtocolError(f"rank {self.rank}: rank {peer} sent a message length of {n} bytes; expected 0 to "
                                f"{limit}")
        return n

    def _send(self, r: int, data) -> None:
        try:
            self.peers[r].sendall(data)
        except OSError as e:
            raise ConnectionError(f"rank {self.rank}: cannot send to rank {r}: {e}") from None
        self.counters.add(sent=len(data))

    # -- collectives -------------------------------------------------------------------------------------------------
    @property
    def overlaps_compute(self) -> bool:
        """iallreduce runs on the ring's transport thread: buckets move while backward computes."""
        return self._ring is not None and self.world_size > 1

    def allreduce(self, flat: np.ndarray) -> None:
        """Sum the (N,) contiguous array over ranks, in place (rank order, bitwise the same on every rank)."""
        if self.world_size == 1 or flat.size == 0:
            return
        self._connected().allreduce(flat)

    def iallreduce(self, flat: np.ndarray):
        """Start the same sum on the transport thread; the result is in `flat` after handle.wait(). Collectives
        started later (of any kind) run after it."""
        return self._connected().iallreduce(flat)

    def _connected(self):
        if self._ring is None:
            raise ConnectionError(f"rank {self.rank}: collective before connect()")
        return self._ring

    def _drain(self) -> None:
        """Before a collective of the mesh's own: the ring's queued all-reduces use the same sockets."""
        if self._ring is not None:
            self._ring.drain()

    def broadcast(self, flat: np.ndarray, root: int = 0) -> None:
        if self.world_size == 1 or flat.size == 0:
            return
        t0 = time.perf_counter()
        self._drain()
        view = memoryview(flat).cast("B")
        if self.rank == root:
            for r in self.peers:
                self._send(r, view)
        else:
            self._recv_into(root, view)
        self.counters.add(payload=flat.nbytes, blocked_s=time.perf_counter() - t0, collectives=1)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on the ring (ring.RingAllreduce.allgather_rows): first the lengths,
        each checked against max_gather_bytes before anything is allocated, then the records, W-1 hops round the
        ring. Bitwise what the star through rank 0 (_allgather_bytes_star) returns."""
        if len(data) > self.max_gather_bytes:
            raise ValueError(f"rank {self.rank}: allgather record of {len(data)} bytes exceeds "
                             f"{self.max_gather_bytes}")
        if self.world_size == 1:
            return [bytes(data)]
        ring = self._connected()
        lengths = ring.allgather(np.array([len(data)], dtype=np.int64))[:, 0]
        for r, n in enumerate(lengths):
            if not 0 <= n <= self.max_gather_bytes:
                raise ProtocolError(f"rank {self.rank}: rank {r} sent a message length of {n} bytes; "
                                    f"expected 0 to {self.max_gather_bytes}")
        rows = [np.empty(int(n), dtype=np.uint8) for n in lengths]
        rows[self.rank][:] = np.frombuffer(data, dtype=np.uint8)
        ring.allgather_rows(rows)
        return [row.tobytes() for row in rows]

    def allgather_array(self, x: np.ndarray) -> np.ndarray:
        """(N,) array, the same size and dtype on every rank -> (W, N) on the ring (compressed payloads)."""
        return self._connected().allgather(x)

    def iallgather_array(self, x: np.ndarray):
        """allgather_array on the ring's transport thread, in order with the queued all-reduces; handle.wait()
        returns the (W, N) rows."""
        return self._connected().iallgather(x)

    def tune_link(self, link: dict) -> list[dict]:
        """Size the ring's socket buffers to the bandwidth-delay product of the link measured at start-up
        (cluster/link_probe.py: bandwidth_Bps x latency_s, the all-reduce round trip); ring.tune_socket sets them only
        where autotuning could not reach 2 x BDP. Returns each neighbour socket's resulting options."""
        bdp = int(float(link.get("bandwidth_Bps", 0.0)) * float(link.get("latency_s", 0.0)))
        self.bdp_bytes = bdp
        out = []
        for r in sorted({(self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size} - {self.rank}):
            out.append(tune_socket(self.peers[r], bdp))
        return out

    def _allgather_bytes_star(self, data: bytes) -> list[bytes]:
        """The star through rank 0 that allgather_bytes used before the ring (kept as the ring's reference)."""
        if len(data) > self.max_gather_bytes:
            raise ValueError(f"rank {self.rank}: allgather record of {len(data)} bytes exceeds "
                             f"{self.max_gather_bytes}")
        self._drain()
        if self.rank == 0:
            out = [data]
            for r in range(1, self.world_size):
                out.append(self._recv_exact(r, self._recv_length(r, self.max_gather_bytes)))
            packed = b"".join(struct.pack("<q", len(b)) + b for b in out)
            for r in range(1, self.world_size):
                self._send(r, struct.pack("<q", len(packed)) + packed)
            return out
        self._send(0, struct.pack("<q", len(data)) + data)
        packed = self._recv_exact(0, self._recv_length(0, self.world_size * (8 + self.max_gather_bytes)))
        out, i = [], 0
        while i < len(packed):
            if len(packed) - i < 8:
                raise ProtocolError(f"rank {self.rank}: rank 0 sent a truncated allgather reply")
            (k,) = struct.unpack("<q", packed[i:i + 8])
            if not 0 <= k <= min(self.max_gather_bytes, len(packed) - i - 8):
                raise ProtocolError(f"rank {self.rank}: rank 0 sent an allgather record length of {k} bytes; "
                                    f"expected 0 to {min(self.max_gather_bytes, len(packed) - i - 8)}")
            out.append(packed[i + 8:i + 8 + k])
            i += 8 + k
        if len(out) != self.world_size:
            raise ProtocolError(f"rank {self.rank}: rank 0 sent {len(out)} allgather records; expected "
                                f"{self.world_size}")
        return out

    def barrier(self) -> None:
        self.allgather_bytes(b"")

    def abort(self) -> None:
        """From another thread: end every blocked call on this group now (its sockets are shut down)."""
        for s in list(self.peers.values()):
            try:
                s.shutdown(2)  # SHUT_RDWR
            except OSError:
                pass

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._listener.close()
        for s in self.peers.values():
            try:
                s.close()
            except OSError:
                pass
        self.peers.clear()
