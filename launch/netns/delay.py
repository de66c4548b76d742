"""A fixed one-way delay for the packets of one NFQUEUE queue: this kernel has no netem, so the emulated link's
propagation delay is a small user-space program. The kernel hands each packet that an iptables `-j NFQUEUE` rule
sends to queue Q to this process (metadata only: the packet id, never its bytes); the process accepts it `delay_ms`
after it arrived. The delay is the same for every packet, so packets leave in arrival order and one batch verdict
("accept every id <= k") releases all that are due at once.

Raw nfnetlink over a Python netlink socket (linux/netfilter/nfnetlink_queue.h): no compiled binding needed.
Runs only inside the private network namespaces of `ndtrain bench network` (launch/netns/link.py starts it
with `ip netns exec`); needs CAP_NET_ADMIN.

    python -m ndtrain.launch.netns.delay --queue 0 --delay-ms 3

Prints "ready" once bound (the caller waits for it), runs until SIGTERM/SIGINT, then prints a one-line summary.
Precision: the Python loop wakes within ~0.1 ms on an idle machine; on a loaded one more (measure with ping).
"""
from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4  # take GSO packets whole (the kernel would otherwise segment them before queueing)
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
SO_RCVBUFFORCE = 33
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGEN_HDR = struct.Struct("=BBH")    # family, version, res_id (big-endian queue number, packed by hand)


def nlattr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def nfq_message(msg: int, queue: int, attrs: bytes, seq: int = 0, flags: int = NLM_F_REQUEST) -> bytes:
    """nlmsghdr + nfgenmsg(AF_UNSPEC, version 0, queue) + attributes."""
    body = NFGEN_HDR.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def bind_messages(queue: int, maxlen: int) -> list[bytes]:
    """Bind queue (family AF_INET), ask for metadata only, a queue of maxlen packets, GSO packets unsegmented."""
    cmd = nlattr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    params = nlattr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    cfg = (params + nlattr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
           + nlattr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
           + nlattr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))
    return [nfq_message(NFQNL_MSG_CONFIG, queue, cmd, seq=1, flags=NLM_F_REQUEST | NLM_F_ACK),
            nfq_message(NFQNL_MSG_CONFIG, queue, cfg, seq=2, flags=NLM_F_REQUEST | NLM_F_ACK)]


def verdict_batch(queue: int, last_id: int) -> bytes:
    """Accept every queued packet with id <= last_id."""
    return nfq_message(NFQNL_MSG_VERDICT_BATCH, queue, nlattr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last_id)))


def packet_ids(data: bytes) -> list[int]:
    """The packet ids in one netlink datagram (one or more NFQNL_MSG_PACKET messages). Raises OSError on a netlink
    error message (e.g. the ack of a refused bind)."""
    ids, off = [], 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + NLMSG_HDR.size)
            if err:
                raise OSError(-err, f"nfnetlink: {os.strerror(-err)}")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + NLMSG_HDR.size + NFGEN_HDR.size
            while a + 4 <= off + length:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def open_queue(queue: int, maxlen: int = 8192, rcvbuf: int = 8 << 20) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)  # an overflow drops packets (as a full queue would), no error
    s.settimeout(5.0)
    for m in bind_messages(queue, maxlen):
        s.send(m)
        packet_ids(s.recv(65536))  # the ack: raises if the kernel refused
    s.setblocking(False)
    return s


def run(queue: int, delay_s: float) -> int:
    s = open_queue(queue)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    pending: collections.deque = collections.deque()  # (release time, packet id), in arrival order
    n = late = 0
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        # select, not poll/epoll: their timeouts are whole milliseconds (Python rounds 0.2 ms up to 1 ms, which put
        # 2 ms on the lan profile's 0.4 ms RTT); select's is in microseconds
        wait_s = max(0.0, pending[0][0] - now) if pending else 0.2
        try:
            select.select([s], [], [], wait_s)
        except InterruptedError:
            continue
        while True:
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            t = time.monotonic()
            for pid in packet_ids(data):
                pending.append((t + delay_s, pid))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            due, last = pending.popleft()
            n += 1
            late += now - due > 1e-3
        if last is not None:
            s.send(verdict_batch(queue, last))
    print(f"delay: queue {queue}, {n} packets released, {late} more than 1 ms late", flush=True)
    s.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number (0-65535)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    a = p.parse_args(argv)
    if not 0 <= a.queue <= 65535 or not 0 <= a.delay_ms <= 10_000:
        print("delay: --queue must be 0..65535 and --delay-ms 0..10000", file=sys.stderr)
        return 2
    return run(a.queue, a.delay_ms / 1e3)


if __name__ == "__main__":
    sys.exit(main())
