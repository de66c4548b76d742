"""What the MPI and Ray launchers share: the resolved topology (printed at start and stored in the run directory),
the supervision loop around the coordinator (which passes a Ctrl-C / SIGTERM of the driver on to the ranks:
cluster/interrupt.py), and the job's exit status."""
from __future__ import annotations

import socket
import sys
import time
from dataclasses import asdict, dataclass, field

from . import interrupt


@dataclass
class Topology:
    backend: str
    hosts: list[str]
    ranks: int
    threads_per_rank: int
    global_batch: int | None = None
    transport: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def per_rank_batch(self) -> int | None:
        return None if self.global_batch is None else self.global_batch // self.ranks

    def line(self) -> str:
        batch = "" if self.global_batch is None else \
            f", batch {self.global_batch} global = {self.per_rank_batch} per rank"
        via = f" via {self.transport}" if self.transport else ""
        return (f"ndtrain: backend {self.backend}{via}: {self.ranks} rank{'s' if self.ranks != 1 else ''} on "
                f"{', '.join(self.hosts)}, {self.threads_per_rank} BLAS thread(s) per rank{batch}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_rank_batch"] = self.per_rank_batch
        return d


def local_host() -> str:
    return socket.gethostname()


def supervise(coord, is_running, grace_s: float = 3.0, poll_s: float = 0.2):
    """Pump the coordinator until every rank is done or something failed.
    is_running(): None while the ranks' processes run, else (ok: bool, description: str) once they have ended.
    Returns None on success (every rank finished, or stopped on request: coord.interrupted_step), else the
    coordinator's Failure. A stop requested in this process (interrupt.handle_signals) is passed to the ranks."""
    ended_at = None
    while True:
        if interrupt.requested() and not coord.stop_requested:
            coord.request_stop()
        coord.poll(poll_s)
        if coord.failure is not None:
            return coord.failure
        status = is_running()
        if status is None:
            if coord.finished:
                return None
            continue
        ok, what = status
        if coord.finished and ok:
            return None
        if ended_at is None:
            ended_at = time.monotonic()  # give in-flight messages (an error report) a moment to arrive
        elif time.monotonic() - ended_at > grace_s:
            if ok and coord.finished:
                return None
            missing = sorted(set(range(coord.world_size)) - coord.done)
            coord.fail(missing[0] if missing else None, None,
                       f"{what}" + ("" if ok else "") + (f"; ranks {missing} never reported done" if missing else ""))
            return coord.failure


def report_failure(failure) -> None:
    print(failure.message(), file=sys.stderr, flush=True)


def job_status(coord, failure, run_dir=None) -> int:
    """The launcher's exit status once supervise returned: 0 (done), 1 (failed; the failure is printed), 2 (a rank
    stopped for a reason it names in one line: non-finite steps, a full disk), or
    128 + signal when the ranks stopped on request (the `interrupted at step N; resume with ...` line is printed,
    naming run_dir)."""
    if failure is not None:
        report_failure(failure)
        return 2 if failure.named else 1  # 2: the run stopped for a reason it names (one line), as a local run
    step = coord.interrupted_step
    if step is not None:
        print(interrupt.interrupted_line(step, run_dir), file=sys.stderr, flush=True)
        return interrupt.exit_code()
    return 0
