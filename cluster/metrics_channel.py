"""The rank side of the coordinator link: send metrics, heartbeats and errors without blocking training.

A rank finds the coordinator through the environment the launcher sets (NDTRAIN_COORD_ADDR = host:port,
NDTRAIN_COORD_TOKEN = a per-run secret). Messages are JSON lines over one TCP connection; a background thread
sends them, so `log()` costs one queue put on the training thread. The connection first proves the token by an
HMAC challenge-response (cluster.coord_server.dial); the first message is a hello with the rank's host and pid.

RankReporter has the run-directory sink interface (launch.rundir.MetricsSink: log / summary / close), so the worker
loop logs the same way whether it writes the run directory itself (local) or reports to a coordinator.

    rep = RankReporter.from_env(rank, world_size)       # None when no coordinator is configured
    rep.log({"step": 5, "loss_sum": ..., "count": ..., "step_time": ..., "comm_time": ...})
    rep.error(step, exc)                                 # before the rank dies: sent synchronously
    rep.close()                                          # says "done", flushes, stops the thread

What the coordinator aggregates (same step across ranks): loss_sum, count, tokens, samples (summed; loss =
sum loss_sum / sum count), step_time (max: the slowest rank), comm_time (mean; comm_share = mean of
comm_time / step_time), tokens/step_time summed as tokens_per_s; any other key is taken from the lowest rank.

Liveness: heartbeats come from the sender thread, so they prove the process is alive, not that it progresses. So
each heartbeat also carries the rank's step, how long it has spent on it, and whether it is waiting in a collective
(rank_entry.WatchedComm calls `enter_comm` / `leave_comm`): the coordinator names a rank as hung when the others
have waited for it in a collective too long. Non-reporting ranks send their timing (`step_s`, and `step_time` /
`comm_time` if the loop logs them) as small "timing" messages, for the per-rank step times of the aggregated record.

The other direction (the coordinator's replies, read by a second thread): an "ack" for every heartbeat, and "stop"
when the driver got Ctrl-C or SIGTERM (the rank's loop then stops at a step boundary: cluster/interrupt.py). A rank
whose coordinator connection closes, or that has no ack for ack_timeout_s, has lost its coordinator (the driver
died, or its host): on_lost(reason) is called once; from_env makes that interrupt.coordinator_lost, which stops the
loop with a checkpoint and ends the process within a bounded time (so no rank trains on headless).

Each timing message also carries `compute_s`, the median over its steps of the rank's own compute time per step (step
time minus time blocked in collectives: the larger of WatchedComm's measure and the transport's counters), and
`steps`, how many steps it covers: the coordinator's straggler view (cluster/straggler.py) compares these.

Test-only fault injection (read once, at construction): NDTRAIN_TEST_HANG="rank:step" makes that rank sleep forever
when it reaches that step; NDTRAIN_TEST_DIE="rank:step" SIGKILLs it there (the rank a process started as);
NDTRAIN_TEST_STEP_DELAY=seconds slows every step (so a test can kill a rank mid-run), and
NDTRAIN_TEST_STEP_DELAY="rank:seconds[,rank:seconds]" only the ranks named (a straggler).
"""
from __future__ import annotations

import json
import math
import os
import queue
import socket
import threading
import time
import traceback as tb_mod

from . import interrupt
from .coord_server import dial

ENV_ADDR = "NDTRAIN_COORD_ADDR"
ENV_TOKEN = "NDTRAIN_COORD_TOKEN"
HEARTBEAT_S = 2.0
ACK_TIMEOUT_S = 15.0  # no reply to heartbeats for this long: the coordinator is gone (a dead host sends no FIN)
MAX_REPLY_BYTES = 4096  # the coordinator's replies are tiny; anything longer is dropped unread
TIMING_EVERY_S = 1.0  # a rank sends its step time at most this often
STEP_PING_S = 0.1  # ... and its step at most this often (so a failure names the step it died at)
ENV_TEST_HANG = "NDTRAIN_TEST_HANG"
ENV_TEST_STEP_DELAY = "NDTRAIN_TEST_STEP_DELAY"
ENV_TEST_DIE = "NDTRAIN_TEST_DIE"
_STOP = object()


def _test_faults(rank: int, env) -> tuple[int | None, float]:
    """(step at which this rank hangs or None, seconds of delay per step) from the test-only variables."""
    hang = None
    spec = env.get(ENV_TEST_HANG, "")
    if spec:
        r, _, k = spec.partition(":")
        if not (r.strip().isdigit() and k.strip().isdigit()):
            raise ValueError(f"{ENV_TEST_HANG}={spec!r}: expected 'rank:step'")
        hang = int(k) if int(r) == rank else None
    delay, spec = 0.0, env.get(ENV_TEST_STEP_DELAY, "") or "0"
    try:
        if ":" not in spec:
            delay = float(spec)
        for part in spec.split(",") if ":" in spec else ():
            r, _, sec = part.partition(":")
            delay = float(sec) if int(r) == rank else delay
    except ValueError:
        raise ValueError(f"{ENV_TEST_STEP_DELAY}={spec!r}: expected seconds or 'rank:seconds[,rank:seconds]'") from None
    return hang, delay


def encode(msg: dict) -> bytes:
    return (json.dumps(_plain(msg), separators=(",", ":")) + "\n").encode()


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_ADDR}={addr!r}: expected host:port")
    return host, int(port)


class RankReporter:
    """One rank's link to the coordinator. reports: does this rank log train/eval records? (the coordinator waits
    for a record from every reporting rank before it writes the aggregated line)."""

    def __init__(self, addr: str, token: str, rank: int, world_size: int, reports: bool = True,
                 heartbeat_s: float = HEARTBEAT_S, connect_timeout: float = 30.0, on_stop=None, on_lost=None,
                 ack_timeout_s: float = ACK_TIMEOUT_S):
        """on_stop(): the coordinator asked this rank to stop; on_lost(reason): the coordinator is gone (once)."""
        self.rank, self.world_size, self.reports = rank, world_size, reports
        self._on_stop, self._on_lost, self._ack_timeout_s = on_stop, on_lost, float(ack_timeout_s)
        self.lost_reason = ""  # why the coordinator counts as lost ("" while it answers)
        self.stop_requested = False
        self.step = 0
        self._q: queue.Queue = queue.Queue()
        self._closed = False
        host, port = parse_addr(addr)
        # the HMAC challenge-response of cluster.coord_server: the token itself never goes over the wire
        self._sock = dial(host, port, token, rank, timeout=connect_timeout)
        self._sock.settimeout(10.0)
        self._send_now({"type": "hello", "rank": rank, "world_size": world_size,
                        "host": socket.gethostname(), "pid": os.getpid(), "reports": bool(reports)})
        self._heartbeat_s = heartbeat_s
        self._lost = False
        self._last_ack = time.monotonic()
        # liveness and timing (written by the training thread, read by the sender thread's heartbeats)
        self._step_t0 = time.monotonic()  # when the current step began (the last progress() call)
        self._window_s, self._window_comm_s, self._window_n = 0.0, 0.0, 0
        self._window_compute: list[float] = []  # each step's compute seconds since the last timing message
        self._blocked0 = 0.0  # the transport's blocked seconds when the current step began
        self._progress_step = -2  # the step of the last progress() call (the first call times set-up: not counted)
        self._last_timing = self._last_ping = 0.0
        self._comm_depth, self._comm_t0, self._comm_s = 0, 0.0, 0.0  # collective nesting; entry time; this step's
        self._counters = None  # the communicator's CommCounters (watch_counters): bytes moved, for stall detection
        self._inflight = 0  # bytes handed to the blocking collective this rank is in
        self.link_bps: float | None = None  # the link's bandwidth measured at start-up (bytes/s; cluster/link_probe.py)
        self._hang_at, self._step_delay = _test_faults(rank, os.environ)
        self._die_at = _test_faults(rank, {ENV_TEST_HANG: os.environ.get(ENV_TEST_DIE, "")})[0]
        self._training = False  # progress() called: set-up (data, model, first broadcast) is over
        self._thread = threading.Thread(target=self._run, name=f"ndtrain-reporter-{rank}", daemon=True)
        self._thread.start()
        threading.Thread(target=self._listen, name=f"ndtrain-reporter-{rank}-replies", daemon=True).start()

    @classmethod
    def from_env(cls, rank: int, world_size: int, reports: bool = True, env=None) -> "RankReporter | None":
        env = os.environ if env is None else env
        addr = env.get(ENV_ADDR)
        if not addr:
            return None
        return cls(addr, env.get(ENV_TOKEN, ""), rank, world_size, reports=reports,
                   on_stop=lambda: interrupt.STOP.request("stop from the coordinator"),
                   on_lost=interrupt.coordinator_lost)

    # -- the sink interface ----------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if "step" not in record:
            raise ValueError(f"rank {self.rank}: every metrics record needs a 'step'; got keys {sorted(record)}")
        self.step = int(record["step"])
        self._q.put({"type": "log", "rank": self.rank, "record": record})

    def summary(self, summary: dict) -> None:
        self._q.put({"type": "summary", "rank": self.rank, "summary": summary})

    def event(self, msg: dict) -> None:
        """A small message of the launcher's protocol (an elastic run's {"type": "membership", ...})."""
        self._q.put({**msg, "rank": self.rank})

    def notice(self, message: str) -> None:
        """A one-off line for the user (advice, a skipped step): the coordinator hands it to its sink's notice."""
        self._q.put({"type": "notice", "rank": self.rank, "message": str(message)[:2000]})

    def progress(self, step: int) -> None:
        """The training loop is starting step `step` (0-based; = steps done). Carried by the next heartbeat; the
        time since the previous call is this rank's step time, sent as a "timing" message about once a second."""
        step = int(step)
        if self._step_delay > 0:
            time.sleep(self._step_delay)
        if self._die_at is not None and step == self._die_at:
            os.kill(os.getpid(), 9)  # test-only: kill -9 of this rank at this step (NDTRAIN_TEST_DIE)
        if self._hang_at is not None and step == self._hang_at:
            self.step = step
            while True:  # test-only: a hung rank (NDTRAIN_TEST_HANG); the heartbeat thread keeps running
                time.sleep(3600)
        now = time.monotonic()
        self._training = True
        blocked = self._counters.blocked_s if self._counters is not None else 0.0
        if step == self._progress_step + 1:  # (not self.step: log() sets it to the steps done, = this step)
            dt = now - self._step_t0
            self._window_s += dt
            self._window_comm_s += self._comm_s
            self._window_n += 1
            self._window_compute.append(max(0.0, dt - max(self._comm_s, blocked - self._blocked0)))
        self.step, self._step_t0, self._comm_s, self._blocked0 = step, now, 0.0, blocked
        self._progress_step = step
        if self._window_n and now - self._last_timing >= TIMING_EVERY_S:
            compute = sorted(self._window_compute)
            self._q.put({"type": "timing", "rank": self.rank, "step": step,
                         "step_s": self._window_s / self._window_n, "comm_s": self._window_comm_s / self._window_n,
                         "compute_s": compute[len(compute) // 2], "steps": self._window_n})
            self._window_s, self._window_comm_s, self._window_n = 0.0, 0.0, 0
            self._window_compute = []
            self._last_timing = self._last_ping = now
        elif now - self._last_ping >= STEP_PING_S:
            self._q.put({"type": "step", "rank": self.rank, **self.liveness()})
            self._last_ping = now

    def watch_counters(self, counters) -> None:
        """Heartbeats carry these counters' bytes moved: the coordinator's stall rule is time without progress."""
        self._counters = counters

    def enter_comm(self, nbytes: int = 0) -> None:
        """The training thread is about to block in a collective of nbytes (rank_entry.WatchedComm)."""
        if self._comm_depth == 0:
            self._comm_t0 = time.monotonic()
            self._inflight = int(nbytes)
        self._comm_depth += 1

    def leave_comm(self) -> None:
        self._comm_depth -= 1
        if self._comm_depth == 0:
            self._comm_s += time.monotonic() - self._comm_t0

    def liveness(self) -> dict:
        """What a heartbeat says beyond "alive": the step, seconds on it, seconds waiting in a collective (or None)."""
        now = time.monotonic()
        out = {"step": self.step, "step_age_s": now - self._step_t0, "training": self._training,
               "comm_wait_s": (now - self._comm_t0) if self._comm_depth > 0 else None}
        c = self._counters
        if c is not None:  # progress: bytes moved so far; counted as they move (the ring) or only when a call ends
            out["comm_bytes"] = int(c.bytes_sent + c.bytes_received)
            out["comm_counted"] = not getattr(c, "estimated", False)
        if self._comm_depth > 0 and self._inflight:
            out["inflight_bytes"] = self._inflight
        if self.link_bps:
            out["link_bps"] = float(self.link_bps)
        return out

    def error(self, step: int | None, exc: BaseException | str) -> None:
        """Report a fatal error now (synchronously, after what is queued): the process is about to end."""
        step = self.step if step is None else int(step)
        if getattr(exc, "one_line", False):  # a failure that names its cause (non-finite run, full disk): no traceback
            msg = {"type": "error", "rank": self.rank, "step": step, "message": str(exc), "traceback": ""}
        else:
            text = exc if isinstance(exc, str) else "".join(tb_mod.format_exception(type(exc), exc,
                                                                                      exc.__traceback__))
            msg = {"type": "error", "rank": self.rank, "step": step, "traceback": text}
        self._q.put(msg)
        self.close(done=False)

    def interrupted(self, step: int) -> None:
        """The loop stopped on request after `step` steps, with a checkpoint (cluster/interrupt.py); then close."""
        self._q.put({"type": "interrupted", "rank": self.rank, "step": int(step)})
        self.close(done=False)

    @property
    def lost(self) -> bool:
        return bool(self.lost_reason)

    def close(self, done: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if done:
            self._q.put({"type": "done", "rank": self.rank, "step": self.step})
        self._q.put(_STOP)
        self._thread.join(timeout=10.0)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reply thread
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass

    # -- the coordinator's replies -----------------------------------------------------------------------------------
    def _lose(self, reason: str) -> None:
        if self._closed or self.lost_reason:
            return
        self.lost_reason = reason
        self._lost = True
        if self._on_lost is not None:
            self._on_lost(reason)

    def _listen(self) -> None:
        buf = b""
        while not self._closed:
            try:
                chunk = self._sock.recv(MAX_REPLY_BYTES)
            except TimeoutError:
                continue  # the socket's timeout (set for sends); the ack deadline is checked by the sender
            except OSError as e:
                self._lose(f"its connection failed ({e})")
                return
            if not chunk:
                self._lose("it closed the connection")
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    kind = json.loads(line).get("type")
                except (ValueError, AttributeError):
                    continue
                if kind == "ack":
                    self._last_ack = time.monotonic()
                elif kind == "stop" and not self.stop_requested:
                    self.stop_requested = True
                    if self._on_stop is not None:
                        self._on_stop()
            if len(buf) > MAX_REPLY_BYTES:
                buf = b""  # not a reply of ours

    # -- sender thread ---------------------------------------------------------------------------------------------
    def _send_now(self, msg: dict) -> None:
        self._sock.sendall(encode(msg))

    def _run(self) -> None:
        last_hb = time.monotonic()
        while True:
            # a heartbeat at least every heartbeat_s, however busy the queue (timing messages come every second)
            wait = max(0.0, self._heartbeat_s - (time.monotonic() - last_hb))
            try:
                msg = self._q.get(timeout=wait)
            except queue.Empty:
                msg = None
            if msg is _STOP:
                return
            if not self._lost and time.monotonic() - self._last_ack > self._ack_timeout_s:
                self._lose(f"no reply to heartbeats for {time.monotonic() - self._last_ack:.0f} s")
            if self._lost:
                continue
            try:
                if msg is not None:
                    self._send_now(msg)
                if time.monotonic() - last_hb >= self._heartbeat_s:
                    self._send_now({"type": "hb", "rank": self.rank, **self.liveness()})
                    last_hb = time.monotonic()
            except OSError as e:
                self._lose(f"cannot send to it ({e})")
                self._lost = True  # training must not block on a coordinator that is gone
