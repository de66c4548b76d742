"""What a local run shows while it trains, and the TensorBoard events it writes (the mpi / ray coordinator does the
same for distributed runs: cluster/coordinator.py).

    console = Console(total_steps=600, log_format="text", quiet=False)   # or "json"
    sink = TeeSink([RunWriter(out), TensorBoardSink(out / "tb"), console])
    run_worker(cfg, comm, sink)                                          # records reach every part

Text mode: on a terminal (stdout a TTY) a live tqdm line on stderr - step/total, loss, lr, tokens/s, ETA - with eval
results printed above it; otherwise (logs, CI) one plain line per record, as before:
    step 50: loss 0.5257 lr 0.05 (76506 items/s)
    step 200: eval loss 0.0127 accuracy 1.0000
--quiet prints neither. JSON mode (`--log-format json`): one JSON object per event on stdout and nothing else there,
for scripts and CI; --quiet does not silence it. Events: {"event": "topology", ...}, {"event": "train", "step",
"total_steps", "loss", "lr", "tokens_per_s", "eta_s", ...}, {"event": "eval", "step", "eval": {...}},
{"event": "notice", "message"}, {"event": "done", ...summary}, {"event": "report", "path"}. Non-finite numbers are
written as the strings "nan" / "inf" (as in metrics.jsonl).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ndtrain.launch.rundir import MetricsSink, _jsonable

LOG_FORMATS = ("text", "json")


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch when it is installed
    (seconds, and product code must not load torch); scalars never need it."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX tolerates
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


def summary_writer(path):
    return summary_writer_class()(str(path))


class TensorBoardSink(MetricsSink):
    """Scalars of every record: train/<key> for train records, eval/<key> for eval records (the coordinator writes
    its aggregated records through one of these too); an eval record's wall_time also gives eval/wall_time and
    eval_vs_wall_s/<key>, the eval metrics against whole seconds of wall time.
    The writer is created at the first record, so a run that fails at start-up leaves no events file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tb = None
        self._cls = summary_writer_class()  # imported now (~0.5 s), not inside the first timed window of steps

    def log(self, record: dict) -> None:
        if "step" not in record or "error" in record:
            return
        if self._tb is None:
            self._tb = self._cls(str(self.path))
        step = int(record["step"])
        ev = record.get("eval")
        prefix, values = ("eval", ev) if isinstance(ev, dict) else ("train", record)
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        for k, v in values.items():
            if k != "step" and num(v):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if prefix == "eval" and num(record.get("wall_time")):
            # metrics over wall-clock time (BLEU vs minutes): the same values with whole seconds as the x axis
            wall = record["wall_time"]
            self._tb.add_scalar("eval/wall_time", wall, step)
            for k, v in values.items():
                if num(v):
                    self._tb.add_scalar(f"eval_vs_wall_s/{k}", v, int(round(wall)))

    def summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class TeeSink(MetricsSink):
    """Every record to every part, in order (the RunWriter first: metrics.jsonl is the record of the run)."""

    def __init__(self, parts: list[MetricsSink]):
        self.parts = list(parts)

    def log(self, record: dict) -> None:
        for p in self.parts:
            p.log(record)

    def summary(self, summary: dict) -> None:
        for p in self.parts:
            p.summary(summary)

    def progress(self, step: int) -> None:
        """Called by the trainer before every step (the coordinator link uses it for heartbeats)."""
        for p in self.parts:
            fn = getattr(p, "progress", None)
            if fn is not None:
                fn(step)

    def notice(self, message: str) -> None:
        for p in self.parts:
            fn = getattr(p, "notice", None)
            if fn is not None:
                fn(message)

    def close(self) -> None:
        errors = []
        for p in self.parts:
            try:
                p.close()
            except Exception as e:  # noqa: BLE001 - close the others, then re-raise the first
                errors.append(e)
        if errors:
            raise errors[0]


def format_eval(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class Console(MetricsSink):
    """The run as a person or a script watches it (see the module docstring)."""

    def __init__(self, total_steps: int, log_format: str = "text", quiet: bool = False, stream=None,
                 err_stream=None, bar: bool | None = None):
        """stream / err_stream: default sys.stdout / sys.stderr. bar: force the live line on (True) or off (False);
        default: on in text mode when stream is a TTY and not quiet."""
        if log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format: must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
        self.total = int(total_steps)
        self.json = log_format == "json"
        self.quiet = quiet
        self.out = stream if stream is not None else sys.stdout
        self.err = err_stream if err_stream is not None else sys.stderr
        if bar is None:
            isatty = getattr(self.out, "isatty", None)
            bar = bool(isatty and isatty())
        self.use_bar = bar and not self.json and not quiet
        self._bar = None
        self._t0: float | None = None  # wall clock and step at the first progress call: the ETA's rate
        self._step0 = 0
        self._last: dict = {}

    # -- events ------------------------------------------------------------------------------------------------------
    def emit(self, event: str, payload: dict) -> None:
        """One JSON object on stdout (json mode only)."""
        if self.json:
            self.out.write(json.dumps(_jsonable({"event": event, **payload}), separators=(",", ":")) + "\n")
            self.out.flush()

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the mean rate since the first step of this process (None before one step is done)."""
        if self._t0 is None or step <= self._step0:
            return None
        rate = (time.perf_counter() - self._t0) / (step - self._step0)
        return rate * max(self.total - step, 0)

    def progress(self, step: int) -> None:
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), step
        if self.use_bar:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, initial=step, unit="step", file=self.err, dynamic_ncols=True,
                                 desc="train")
            self._bar.update(max(0, step - self._bar.n))

    def log(self, record: dict) -> None:
        if "error" in record:
            return  # the exception itself reaches the user (cmd_train); metrics.jsonl keeps the record
        ev = record.get("eval")
        if self.json:
            if ev is not None:
                self.emit("eval", record)
            else:
                eta = self.eta_s(int(record["step"]))
                self.emit("train", {**record, "total_steps": self.total, "eta_s": eta})
            return
        if self.quiet:
            return
        if ev is not None:
            self._print(f"step {record['step']}: eval {format_eval(ev)}")
            return
        self._last = record
        if self._bar is not None:
            self._bar.update(max(0, int(record["step"]) - self._bar.n))
            self._bar.set_postfix({"loss": f"{record['loss']:.4g}", "lr": f"{record['lr']:.3g}",
                                   "tok/s": f"{record.get('tokens_per_s', 0.0):.0f}"}, refresh=True)
        elif not self.use_bar:
            self._print(f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3g} "
                        f"({record.get('tokens_per_s', 0.0):.0f} items/s)")

    def notice(self, message: str) -> None:
        if self.json:
            self.emit("notice", {"message": message})
        elif not self.quiet:
            self._print(message)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.err)
        else:
            print(line, file=self.out, flush=True)

    def summary(self, summary: dict) -> None:
        pass  # cmd_train prints the done line / event once the run directory is complete

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
