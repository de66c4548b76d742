"""TCP collectives between ranks on different machines (the Ray backend across nodes).

The connections come from cluster.comm.mesh: one socket per pair of ranks, each authenticated by an HMAC
challenge-response on the run's secret before it carries a byte of payload, the listener bound to the address the
launcher chose (never 0.0.0.0 unless asked). This file is only the collective algorithms on those sockets.

All-reduce is a star through rank 0 in pieces of `piece_bytes`: ranks send their piece, rank 0 sums in rank order
0..W-1 (the same order as the shared-memory path, so results are bit-identical across transports) and sends the sum
back. Every socket has a timeout; a stalled peer raises an error naming the rank. Nothing a peer sends decides how
much memory is taken: all-reduce and broadcast read exactly the caller's buffer, and the length prefixes of
allgather_bytes are checked against `max_gather_bytes` before anything is allocated.

    g = TcpGroup(rank, W, key=derive_key(token, b"mesh"), host="10.0.0.5")    # listening at (host, g.port)
    g.connect([(ip_0, port_0), ..., (ip_W-1, port_W-1)])
"""
from __future__ import annotations

import struct

import numpy as np

from .mesh import HANDSHAKE_S, MeshListener

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
        self._scratch = None

    @property
    def refused(self) -> int:
        """Connections the listener dropped (no or wrong secret, bad framing, timed out, unexpected rank)."""
        return self._listener.refused

    def connect(self, addrs: list[tuple[str, int]]) -> None:
        """addrs[r] = (ip, port) of rank r's listener. Connect to lower ranks, accept the higher ones."""
        self.peers = self._listener.connect(addrs, self._key, timeout=self.timeout)

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

    # -- collectives -------------------------------------------------------------------------------------------------
    def allreduce(self, flat: np.ndarray) -> None:
        if self.world_size == 1 or flat.size == 0:
            return
        per = max(1, self.piece_bytes // flat.itemsize)
        for start in range(0, flat.size, per):
            piece = flat[start:start + per]
            if self.rank == 0:
                if self._scratch is None or self._scratch.nbytes < piece.nbytes:
                    self._scratch = np.empty(max(self.piece_bytes, piece.nbytes), np.uint8)
                tmp = self._scratch[:piece.nbytes].view(piece.dtype)
                for r in range(1, self.world_size):
                    self._recv_into(r, memoryview(tmp).cast("B"))
                    piece += tmp
                for r in range(1, self.world_size):
                    self._send(r, memoryview(piece).cast("B"))
            else:
                self._send(0, memoryview(piece).cast("B"))
                self._recv_into(0, memoryview(piece).cast("B"))

    def broadcast(self, flat: np.ndarray, root: int = 0) -> None:
        if self.world_size == 1 or flat.size == 0:
            return
        view = memoryview(flat).cast("B")
        if self.rank == root:
            for r in self.peers:
                self._send(r, view)
        else:
            self._recv_into(root, view)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        if len(data) > self.max_gather_bytes:
            raise ValueError(f"rank {self.rank}: allgather record of {len(data)} bytes exceeds "
                             f"{self.max_gather_bytes}")
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

    def close(self) -> None:
        self._listener.close()
        for s in self.peers.values():
            try:
                s.close()
            except OSError:
                pass
        self.peers.clear()
