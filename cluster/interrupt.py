"""Stopping a run at a step boundary, with a checkpoint, as torchrun and Lightning do.

Who asks for a stop (a process-wide request, STOP):
  - the local backend and the MPI/Ray driver: SIGINT (Ctrl-C) or SIGTERM, through `handle_signals()`; a second
    signal raises KeyboardInterrupt at once (abort: no checkpoint, the launchers still end every process);
  - a rank: the coordinator's "stop" message (the driver got the signal), or losing the coordinator
    (`coordinator_lost`: the connection closed, or its heartbeat acks stopped), which also ends the process after a
    grace period however far the loop got (cluster/metrics_channel.py).
How the ranks agree (the checkpoint must be one consistent state): each rank's vote (0 or 1) rides in the step's
first collective, the all-reduce of [loss sum, count] (or the deterministic mode's all-gather); the reduced vote is
the same on every rank, so all stop after the same step. A request that arrives after a rank voted is counted at
the next step: a distributed run stops one step later at most. The loop then writes a checkpoint and raises
Interrupted(step); the launcher prints `interrupted_line` and exits 128 + signal (130 for SIGINT, 143 for SIGTERM).

    with interrupt.handle_signals():          # the main thread of `ndtrain train`
        ...
    buf[2] = interrupt.vote()                 # the loop, before the step's collective
    if interrupt.agreed(buf[2], world): ...   # after it: save a checkpoint, raise Interrupted(step)
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOST_GRACE_S = 10.0  # a rank that lost its coordinator ends its process this long after, stopped cleanly or not
EXIT_LOST = 1  # the exit status of a rank that ended because it lost its coordinator


class Interrupted(Exception):
    """The loop stopped at a step boundary on request, after writing the checkpoint of `step` (steps done)."""

    def __init__(self, step: int, reason: str = ""):
        super().__init__(f"interrupted at step {step}" + (f" ({reason})" if reason else ""))
        self.step, self.reason = int(step), reason


class StopRequest:
    """The process-wide stop request. signum: the signal that asked (None: the request came otherwise)."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""
        self.signum: int | None = None
        self.lost = False  # this rank lost its coordinator: it ends its process once stopped (or at the grace)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str, signum: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.signum = reason, signum
            self._event.set()

    def clear(self) -> None:
        self._event.clear()
        self.reason, self.signum, self.lost = "", None, False


STOP = StopRequest()
_LAST_SIGNAL: list[int | None] = [None]  # the last signal handled (kept after handle_signals, for the exit status)


def requested() -> bool:
    return STOP.requested


def vote() -> float:
    """This rank's vote for stopping after the current step (1.0) or not (0.0): what it adds to the collective."""
    return 1.0 if STOP.requested else 0.0


def agreed(votes: float, world_size: int) -> bool:
    """Do the ranks stop after this step? votes: the reduced vote (the same on every rank). One rank: its own
    request, read now (the next boundary exactly)."""
    return votes > 0 if world_size > 1 else STOP.requested


def exit_code(signum: int | None = None) -> int:
    """The shell's status for a process ended by a signal: 128 + signal (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum or _LAST_SIGNAL[0] or signal.SIGINT)


def interrupted_line(step: int, run_dir) -> str:
    return f"interrupted at step {step}; resume with: ndtrain train --resume {run_dir}"


@contextmanager
def handle_signals():
    """In the main thread: the first SIGINT or SIGTERM requests a stop at the next step boundary; a second one
    raises KeyboardInterrupt (abort). The old handlers come back, and the request is cleared, on exit. Elsewhere
    (not the main thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    STOP.clear()
    _LAST_SIGNAL[0] = None
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _install()
    try:
        yield STOP
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOP.clear()


def _handler(signum, frame) -> None:
    _LAST_SIGNAL[0] = signum
    if STOP.signum is not None:  # a second signal: abort now
        raise KeyboardInterrupt(f"aborted ({signal.Signals(signum).name} twice)")
    STOP.request(signal.Signals(signum).name, signum)
    # os.write, not print: a handler may run while the main thread is inside a buffered write to stderr
    os.write(2, f"ndtrain: {signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint "
                f"(Ctrl-C again to abort)\n".encode())


def _install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


def reinstall() -> None:
    """Put the handlers back after a library replaced them (ray.init sets its own SIGTERM handler in the driver);
    a no-op outside `handle_signals` (our SIGINT handler is not installed) or off the main thread."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _handler:
        _install()


def coordinator_lost(reason: str, grace_s: float = LOST_GRACE_S) -> None:
    """A rank lost its coordinator (the driver died or hangs): stop at the next step boundary (with a checkpoint),
    and end this process after grace_s whatever happens (a peer may be gone too, leaving a collective hung)."""
    STOP.lost = True
    STOP.request(f"lost the coordinator: {reason}")

    def deadline():
        threading.Event().wait(grace_s)
        os._exit(EXIT_LOST)
    threading.Thread(target=deadline, name="ndtrain-lost-coordinator", daemon=True).start()


def end_rank_if_lost() -> None:
    """After the loop stopped: a rank without a coordinator has nobody to report to, and under MPI its launcher
    may be gone (MPI_Finalize could wait forever): end the process now."""
    if STOP.lost:
        os._exit(EXIT_LOST)
