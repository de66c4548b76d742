"""The processes of a job, for tests of process lifetime: a subprocess started in a session of its own, every
process ever seen below it (pid + create time, so a reused pid is never mistaken for one of ours) and every session
those processes belong to (mpiexec starts one of its own). Found by the process tree and session, never by name."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psutil


class Lines:
    """A subprocess's stream, line by line, with the time each line arrived."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def first(self, pattern: str):
        return next(((t, line) for t, line in self.lines if re.search(pattern, line)), None)

    def wait_for(self, pattern: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = self.first(pattern)
            if hit is not None:
                return hit
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.text(join=False)}")

    def text(self, join: bool = True) -> str:
        if join:
            self._t.join(timeout=10)
        return "".join(line for _, line in self.lines)


class JobProcesses:
    def __init__(self, root: subprocess.Popen):
        self.root = root
        self.seen: dict[int, float] = {}  # pid -> create time
        self.sessions: set[int] = set()
        self._own_session = os.getsid(0)
        self.snapshot()

    def snapshot(self) -> None:
        """Record the root and everything below it now."""
        try:
            top = psutil.Process(self.root.pid)
            procs = [top] + top.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
                sid = os.getsid(p.pid)
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
            if sid != self._own_session:  # the test's own session holds pytest: never ours to count or kill
                self.sessions.add(sid)

    def watch(self, until, timeout: float, what: str, every: float = 0.2) -> None:
        """Snapshot every `every` s until until() is true (processes come and go while a job starts)."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            if self.root.poll() is not None:
                raise AssertionError(f"the job ended (status {self.root.returncode}) before {what}")
            self.snapshot()
            time.sleep(every)
        self.snapshot()

    def alive(self) -> list[psutil.Process]:
        """Processes of the job still running: seen below the root, or in one of its sessions (zombies excluded)."""
        out = {}
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out[pid] = p
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter():
            try:
                if p.pid not in out and os.getsid(p.pid) in self.sessions and p.status() != psutil.STATUS_ZOMBIE:
                    out[p.pid] = p
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        return list(out.values())

    def wait_gone(self, timeout: float) -> tuple[list[str], float]:
        """Wait until no process of the job runs; returns (descriptions of those left, seconds waited)."""
        t0 = time.monotonic()
        while True:
            left = self.alive()
            if not left or time.monotonic() - t0 > timeout:
                return [_describe(p) for p in left], time.monotonic() - t0
            time.sleep(0.2)

    def kill_all(self) -> None:
        """Clean-up after a failed test: SIGKILL what is left (ours only: by the recorded tree and sessions)."""
        for p in self.alive():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        if self.root.poll() is None:
            self.root.kill()
        self.root.wait(timeout=10)


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return str(p.pid)
