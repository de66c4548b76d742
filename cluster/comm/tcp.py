"""TCP collectives between ranks on different machines (the Ray backend across nodes).

Every pair of ranks holds one socket (a full mesh: fine for the handful of laptops this is for). All-reduce is a
star through rank 0 in pieces of `piece_bytes`: ranks send their piece, rank 0 sums in rank order 0..W-1 (the same
order as the shared-memory path, so results are bit-identical across transports) and sends the sum back. Every
socket has a timeout; a stalled peer raises an error naming the rank.
"""
from __future__ import annotations

import socket
import struct

import numpy as np

DEFAULT_PIECE_BYTES = 4 << 20


class TcpGroup:
    def __init__(self, rank: int, world_size: int, timeout: float = 60.0, piece_bytes: int = DEFAULT_PIECE_BYTES):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.piece_bytes = piece_bytes
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("0.0.0.0", 0))
        self._listener.listen(world_size)
        self.port = self._listener.getsockname()[1]
        self.peers: dict[int, socket.socket] = {}
        self._scratch = None

    def connect(self, addrs: list[tuple[str, int]]) -> None:
        """addrs[r] = (ip, port) of rank r's listener. Connect to lower ranks, accept the higher ones."""
        for r in range(self.rank):
            s = socket.create_connection(addrs[r], timeout=self.timeout)
            s.sendall(struct.pack("<i", self.rank))
            self.peers[r] = s
        self._listener.settimeout(self.timeout)
        for _ in range(self.rank + 1, self.world_size):
            try:
                s, _ = self._listener.accept()
            except socket.timeout:
                missing = sorted(set(range(self.rank + 1, self.world_size)) - set(self.peers))
                raise TimeoutError(f"rank {self.rank}: ranks {missing} did not connect within {self.timeout} s")
            s.settimeout(self.timeout)
            (r,) = struct.unpack("<i", self._recv_exact(s, 4, None))
            self.peers[r] = s
        for s in self.peers.values():
            s.settimeout(self.timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._listener.close()

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _recv_exact(self, s: socket.socket, n: int, peer: int | None) -> bytes:
        buf = bytearray(n)
        self._recv_into(s, memoryview(buf), peer)
        return bytes(buf)

    def _recv_into(self, s: socket.socket, view: memoryview, peer: int | None) -> None:
        got = 0
        while got < len(view):
            try:
                k = s.recv_into(view[got:])
            except socket.timeout:
                raise TimeoutError(f"rank {self.rank}: waited {self.timeout:.0f} s for data from rank {peer}; "
                                   f"rank {peer} is stuck or dead") from None
            if k == 0:
                raise ConnectionError(f"rank {self.rank}: rank {peer} closed its connection")
            got += k

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
                    self._scratch = np.empty(self.piece_bytes, np.uint8)
                tmp = self._scratch[:piece.nbytes].view(piece.dtype)
                for r in range(1, self.world_size):
                    self._recv_into(self.peers[r], memoryview(tmp).cast("B"), r)
                    piece += tmp
                for r in range(1, self.world_size):
                    self._send(r, memoryview(piece).cast("B"))
            else:
                self._send(0, memoryview(piece).cast("B"))
                self._recv_into(self.peers[0], memoryview(piece).cast("B"), 0)

    def broadcast(self, flat: np.ndarray, root: int = 0) -> None:
        if self.world_size == 1 or flat.size == 0:
            return
        view = memoryview(flat).cast("B")
        if self.rank == root:
            for r in self.peers:
                self._send(r, view)
        else:
            self._recv_into(self.peers[root], view, root)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        if self.rank == 0:
            out = [data]
            for r in range(1, self.world_size):
                (n,) = struct.unpack("<q", self._recv_exact(self.peers[r], 8, r))
                out.append(self._recv_exact(self.peers[r], n, r))
            packed = b"".join(struct.pack("<q", len(b)) + b for b in out)
            for r in range(1, self.world_size):
                self._send(r, struct.pack("<q", len(packed)) + packed)
            return out
        self._send(0, struct.pack("<q", len(data)) + data)
        (n,) = struct.unpack("<q", self._recv_exact(self.peers[0], 8, 0))
        packed = self._recv_exact(self.peers[0], n, 0)
        out, i = [], 0
        while i < len(packed):
            (k,) = struct.unpack("<q", packed[i:i + 8])
            out.append(packed[i + 8:i + 8 + k])
            i += 8 + k
        return out

    def barrier(self) -> None:
        self.allgather_bytes(b"")

    def close(self) -> None:
        for s in self.peers.values():
            try:
                s.close()
            except OSError:
                pass
        self.peers.clear()
