"""Processes that do not outlive the driver (Linux; elsewhere these are no-ops).

- `die_with_parent(sig)`: a preexec_fn for subprocess.Popen. The child gets `sig` when the thread that started it
  ends, however the driver ends (kill -9 included): mpiexec gets SIGTERM and ends its ranks (launch/launch_mpi.py).
- `Reaper`: a small watchdog process, in a session of its own (Ctrl-C at the terminal does not reach it), holding
  the read end of a pipe whose write end only the driver has. The driver tells it which processes end with it (the
  local Ray head it started, the head's agents and workers, the rank actors); when the pipe closes (the driver
  exited or died) it SIGKILLs those still alive. A process is named by pid and start time, so a reused pid is never
  hit. Why: Ray's own fate sharing kills raylet with SIGKILL when the driver dies, after which its DashboardAgent
  and RuntimeEnvAgent wait ~60 s on the dead GCS before they exit (measured with ray 2.60).

    reaper = Reaper.start()            # None where /proc is missing
    reaper.track_descendants()         # every process below this one, now
    reaper.close()                     # normal end: whatever is still alive of them is killed
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """preexec_fn: the child receives `sig` when its parent thread ends. None where prctl is unavailable, and off
    the main thread (a worker thread that ends would take the child with it). The libc function is looked up here,
    before the fork: the child only makes the call (and checks that its parent did not die before it could)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)
    return preexec


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live process, from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    if fields[0] in (b"Z", b"X"):  # a zombie is dead already: it only waits for its parent to reap it
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """[(pid, start time)] of every live process below `root`, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append((pid, starts[pid]))
        todo += children.get(pid, [])
    return out


class Reaper:
    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._sent: set[tuple[int, int]] = set()

    @classmethod
    def start(cls) -> "Reaper | None":
        if not os.path.isdir("/proc/self"):
            return None
        proc = subprocess.Popen([sys.executable, "-m", "ndtrain.cluster.fate_share"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, start_new_session=True)
        return cls(proc)

    def track(self, procs) -> None:
        """Processes [(pid, start time)] to kill when this process ends."""
        new = [p for p in procs if p not in self._sent and p[0] != self._proc.pid]
        if not new:
            return
        try:
            self._proc.stdin.write("".join(f"{pid} {start}\n" for pid, start in new).encode())
            self._proc.stdin.flush()
            self._sent.update(new)
        except OSError:
            pass  # the reaper is gone (someone killed it): nothing more to do

    def track_descendants(self, root: int | None = None) -> None:
        self.track(descendants(os.getpid() if root is None else root))

    def close(self, timeout: float = 10.0) -> None:
        """End the reaper: it kills whatever it tracks that is still alive, then exits."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _reap(lines) -> int:
    """The watchdog: read "pid start" lines until EOF, then SIGKILL each that still runs with that start time."""
    tracked = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            tracked.append((int(parts[0]), int(parts[1])))
    for pid, start in tracked:
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    sys.exit(_reap(sys.stdin))
