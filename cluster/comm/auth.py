"""Mutual HMAC challenge-response on a fresh TCP connection: both ends prove they hold the run's secret, the secret
never goes over the wire, and no byte of payload is read before both proofs check out.

    accepting end (server)                                   connecting end (client)
    MAGIC | nonce_s (32 B)                           ───►
                                                     ◄───    MAGIC | claim (u32) | nonce_c (32 B) |
                                                             HMAC(key, "client" | purpose | nonce_s | nonce_c | claim)
    HMAC(key, "server" | purpose | nonce_c | nonce_s | claim) ───►

Every message has a fixed size (nothing read from the peer decides how much is read), every read has a deadline
(an idle or half-open connection is dropped when it passes), and digests are compared with hmac.compare_digest.
Fresh random nonces on both sides make a recorded exchange useless later; `purpose` (b"mesh", b"coord") keeps a
proof for one service from being replayed at another; `claim` (a rank) is covered by the client's MAC, so a peer
can only claim a rank while proving the secret. Used by the TCP mesh (cluster.comm.mesh) and the coordinator's
socket server (cluster.coord_server). After the handshake the stream is plain TCP: authenticated at set-up, not
encrypted or integrity-protected (docs/security.md).

    key = derive_key(token, b"mesh")
    claim = server_handshake(sock, key, b"mesh", accept=lambda r: r in expected, timeout=5)   # -> the peer's rank
    client_handshake(sock, key, b"mesh", claim=my_rank, timeout=5)
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import time
from typing import Callable

MAGIC = b"NDTRAIN1"
NONCE_BYTES = 32
MAC_BYTES = 32  # SHA-256
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES
RESPONSE_BYTES = len(MAGIC) + 4 + NONCE_BYTES + MAC_BYTES


class AuthError(ConnectionError):
    """The peer did not prove it holds the run's secret (or broke the handshake's framing or deadline)."""


class BadProof(AuthError):
    """The peer answered in form, but its HMAC is wrong: it does not hold the run's secret (retrying cannot help)."""


def derive_key(token: str | bytes, purpose: bytes) -> bytes:
    """A key for one use of the run's secret (the coordinator token), so the services never share a key."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if not raw:
        raise ValueError("the run's secret is empty (NDTRAIN_COORD_TOKEN not set?)")
    return hmac.new(raw, b"ndtrain key/" + purpose, hashlib.sha256).digest()


def _mac(key: bytes, side: bytes, purpose: bytes, first: bytes, second: bytes, claim: int) -> bytes:
    msg = side + b"|" + purpose + b"|" + first + second + struct.pack("<I", claim)
    return hmac.new(key, msg, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """n bytes, or AuthError when the peer closes or the deadline passes (an idle / half-open connection)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthError(f"handshake timed out after {got} of {n} bytes")
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except socket.timeout:
            raise AuthError(f"handshake timed out after {got} of {n} bytes") from None
        if k == 0:
            raise AuthError(f"peer closed the connection during the handshake ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except OSError as e:
        raise AuthError(f"cannot send the handshake: {e}") from None


def challenge() -> tuple[bytes, bytes]:
    """The server's first message and its nonce (for servers that drive the exchange themselves, non-blocking)."""
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + nonce_s, nonce_s


def check_response(key: bytes, purpose: bytes, nonce_s: bytes, resp: bytes,
                   accept: Callable[[int], bool] | None = None) -> tuple[int, bytes]:
    """The client's RESPONSE_BYTES answer to our challenge -> (its claim, our proof to send back); AuthError when
    it does not prove the secret or `accept(claim)` is false."""
    if len(resp) != RESPONSE_BYTES or resp[:len(MAGIC)] != MAGIC:
        raise AuthError("not an ndtrain peer (bad handshake magic)")
    i = len(MAGIC)
    (claim,) = struct.unpack("<I", resp[i:i + 4])
    nonce_c = resp[i + 4:i + 4 + NONCE_BYTES]
    mac = resp[i + 4 + NONCE_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, b"client", purpose, nonce_s, nonce_c, claim)):
        raise BadProof("wrong HMAC: the peer does not hold the run's secret")
    if accept is not None and not accept(claim):
        raise AuthError(f"claim {claim} refused (not an expected rank, or already connected)")
    return claim, _mac(key, b"server", purpose, nonce_c, nonce_s, claim)


def server_handshake(sock: socket.socket, key: bytes, purpose: bytes, accept: Callable[[int], bool] | None = None,
                     timeout: float = 5.0) -> int:
    """The accepting end (blocking). Returns the client's claim (its rank) once it proved the secret and
    `accept(claim)` holds; raises AuthError otherwise (the caller closes the socket). Reads exactly RESPONSE_BYTES
    from the peer."""
    deadline = time.monotonic() + timeout
    hello, nonce_s = challenge()
    _send(sock, hello, deadline)
    claim, proof = check_response(key, purpose, nonce_s, recv_exact(sock, RESPONSE_BYTES, deadline), accept)
    _send(sock, proof, deadline)
    return claim


def client_handshake(sock: socket.socket, key: bytes, purpose: bytes, claim: int = 0, timeout: float = 5.0) -> None:
    """The connecting end: answer the challenge with `claim` (our rank), then check the server's proof. AuthError
    when the server is not an ndtrain peer holding the same secret, or refused us."""
    deadline = time.monotonic() + timeout
    challenge = recv_exact(sock, CHALLENGE_BYTES, deadline)
    if challenge[:len(MAGIC)] != MAGIC:
        raise AuthError("not an ndtrain peer (bad handshake magic)")
    nonce_s = challenge[len(MAGIC):]
    nonce_c = secrets.token_bytes(NONCE_BYTES)
    _send(sock, MAGIC + struct.pack("<I", claim) + nonce_c + _mac(key, b"client", purpose, nonce_s, nonce_c, claim),
          deadline)
    try:
        proof = recv_exact(sock, MAC_BYTES, deadline)
    except AuthError as e:
        raise AuthError(f"the peer refused our proof of the run's secret ({e})") from None
    if not hmac.compare_digest(proof, _mac(key, b"server", purpose, nonce_c, nonce_s, claim)):
        raise BadProof("wrong HMAC from the peer: it does not hold the run's secret")
