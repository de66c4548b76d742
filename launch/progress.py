"""What a run shows while it trains, and the TensorBoard events it writes: the same on every backend (a local run's
rank 0 feeds these sinks directly; the coordinator of an mpi / ray run feeds them its aggregated records).

    console = Console(total_steps=600, log_format="text", quiet=False)   # or "json"
    sink = TeeSink([RunWriter(out), TensorBoardSink(out / "tb"), console])   # launch.worker.run_sinks

Text mode: on a terminal (stdout a TTY) a live tqdm line on stderr - step/total, loss, the last validation loss,
lr, tokens/s, steps/s and ETA - with eval results printed above it; otherwise (logs, CI, a pipe) one plain line per
record (format_step_line, the one formatter of step lines):
    step 50/200: loss 0.5257 lr 0.05 tok/s 76506 eta 2s
    step 100/200: eval loss 0.0954 accuracy 0.9900
    step 150/200: loss 0.0284 val 0.0954 lr 0.05 tok/s 79862 eta 1s
The rate and ETA count training time only: the trainer leaves evaluation and checkpoints out of step_time.
--quiet prints neither. JSON mode (`--log-format json`): one JSON object per event on stdout and nothing else there,
for scripts and CI; --quiet does not silence it. Events: {"event": "topology", ...}, {"event": "train", "step",
"total_steps", "loss", "lr", "tokens_per_s", "eta_s", ...}, {"event": "eval", "step", "eval": {...}},
{"event": "notice", "message"}, {"event": "straggler", "rank", "host", "step", "compute_s", "median_s",
"factor"} (cluster/straggler.py; its text line is a notice), {"event": "done", ...summary}, {"event": "report", "path"}. Non-finite numbers are
written as the strings "nan" / "inf" (as in metrics.jsonl).
"""
from __future__ import annotations

import json
import sys
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
        from tensorboardX import SummaryWriter  # tensorboardX: ~0.5 s, only runs that write events
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
        if "step" not in record or "error" in record or "event" in record:  # events: metrics.jsonl, the console
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
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if _num(v))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def format_step_line(record: dict, total: int, eta_s: float | None, val_loss: float | None = None) -> str:
    """The one plain line of a train record, the same fields on every backend (logs, CI, piped output):
    step 50/600: loss 0.5257 val 0.6012 lr 0.05 tok/s 76506 eta 12s"""
    parts = [f"step {int(record['step'])}/{total}:", f"loss {_fmt(record.get('loss'), '.4f')}"]
    if val_loss is not None:
        parts.append(f"val {_fmt(val_loss, '.4f')}")
    parts += [f"lr {_fmt(record.get('lr'), '.3g')}", f"tok/s {_fmt(record.get('tokens_per_s'), '.0f')}",
              f"eta {format_eta(eta_s)}"]
    comm = format_comm(record)
    if comm:
        parts.append(comm)
    return " ".join(parts)


def format_comm(record: dict) -> str:
    """What a step moved between ranks (W > 1): "comm 3.97 MB/step 0.031 s (64%) link 23.1 MB/s"."""
    sent = record.get("comm_sent_bytes")
    if not _num(sent) or sent <= 0:
        return ""
    text = f"comm {sent / 1e6:.3g} MB/step"
    blocked, step = record.get("comm_blocked_s"), record.get("step_time")
    if _num(blocked):
        text += f" {blocked:.3g} s"
        if _num(step) and step > 0:
            text += f" ({min(blocked / step, 1.0):.0%})"
    link = record.get("link_bandwidth_Bps")
    if _num(link) and link > 0:
        text += f" link {link / 1e6:.3g} MB/s"
    return text


def format_done(summary: dict, out) -> str:
    """The final line of `ndtrain train` (every backend) and `ndtrain worker`, from the run's summary."""
    ev = format_eval(summary.get("eval") or {})
    restarts = summary.get("restarts")
    again = f" ({restarts} restart{'s' if restarts != 1 else ''})" if restarts else ""
    return (f"done: {summary.get('steps')} steps in {summary.get('wall_s', 0.0):.1f}s{again}; final loss "
            f"{_fmt(summary.get('final_loss'), '.4f')}; eval {ev}; run directory {out}")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v, spec: str) -> str:
    return format(v, spec) if _num(v) else str(v)


class TrainRate:
    """Seconds per training step: the mean of the records' step_time (each the mean over its window of steps,
    measured by the trainer without evaluation and checkpoint time; from the coordinator, the slowest rank's).
    The rate and ETA a console shows."""

    def __init__(self):
        self.seconds, self.windows = 0.0, 0

    def add(self, record: dict) -> None:
        if _num(record.get("step_time")) and record["step_time"] > 0:
            self.seconds += record["step_time"]
            self.windows += 1

    @property
    def step_s(self) -> float | None:
        return self.seconds / self.windows if self.windows else None

    def eta_s(self, step: int, total: int) -> float | None:
        return None if self.step_s is None else self.step_s * max(total - step, 0)


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
        self.rate = TrainRate()
        self.val_loss: float | None = None  # the last evaluation's loss
        self._last: dict = {}

    # -- events ------------------------------------------------------------------------------------------------------
    def emit(self, event: str, payload: dict) -> None:
        """One JSON object on stdout (json mode only)."""
        if self.json:
            self.out.write(json.dumps(_jsonable({"event": event, **payload}), separators=(",", ":")) + "\n")
            self.out.flush()

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the training rate so far (time in evaluation excluded; None before a record)."""
        return self.rate.eta_s(step, self.total)

    def _ensure_bar(self, step: int) -> None:
        if self._bar is None:
            from tqdm import tqdm  # imported at the first step: `ndtrain --help` and piped runs never load it
            # tqdm's own rate and ETA would count evaluation time: the postfix carries ours
            self._bar = tqdm(total=self.total, initial=step, unit="step", file=self.err, dynamic_ncols=True,
                             desc="train", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                      "[{elapsed}{postfix}]")

    def progress(self, step: int) -> None:
        if self.use_bar:
            self._ensure_bar(step)
            self._bar.update(max(0, step - self._bar.n))

    def log(self, record: dict) -> None:
        if "error" in record:
            return  # the exception itself reaches the user (cmd_train); metrics.jsonl keeps the record
        if "event" in record:  # straggler, membership: their line came as a notice; JSON mode gets the event too
            self.emit(str(record["event"]), {k: v for k, v in record.items() if k != "event"})
            return
        ev = record.get("eval")
        if ev is not None:
            if _num(ev.get("loss")):
                self.val_loss = ev["loss"]
            if self.json:
                self.emit("eval", record)
            elif not self.quiet:
                self._print(f"step {record['step']}/{self.total}: eval {format_eval(ev)}")
                if self._bar is not None:
                    self._bar.set_postfix(self._postfix(self._last), refresh=True)
            return
        step = int(record["step"])
        self.rate.add(record)
        eta = self.eta_s(step)
        if self.json:
            self.emit("train", {**record, "total_steps": self.total, "eta_s": eta})
            return
        if self.quiet:
            return
        self._last = record
        if self.use_bar:
            self._ensure_bar(step)
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix(self._postfix(record), refresh=True)
        else:
            self._print(format_step_line(record, self.total, eta, self.val_loss))

    def _postfix(self, record: dict) -> dict:
        post = {}
        if record:
            post["loss"] = _fmt(record.get("loss"), ".4g")
        if self.val_loss is not None:
            post["val"] = _fmt(self.val_loss, ".4g")
        if record:
            post["lr"] = _fmt(record.get("lr"), ".3g")
            post["tok/s"] = _fmt(record.get("tokens_per_s"), ".0f")
            if self.rate.step_s:
                post["step/s"] = f"{1.0 / self.rate.step_s:.3g}"
            post["eta"] = format_eta(self.eta_s(int(record["step"])))
        return post

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
