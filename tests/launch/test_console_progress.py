"""Progress that tells the truth: the rate and ETA count training time only (not evaluation or checkpoints), the
live bar shows the last validation loss, piped lines have the same fields on every backend (step/total, loss, lr,
tok/s, ETA), and a successful run prints no resume hint."""
import json
import re
import time

import pytest

from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.trainer import Trainer
from ndtrain.launch.cli import main
from ndtrain.launch.job import build_job
from ndtrain.launch.progress import Console, format_step_line
from ndtrain.launch.training import resolve_config

LINE = re.compile(r"step (\d+)/(\d+): loss \d+\.\d{4}( val \d+\.\d{4})? lr [\d.e-]+ tok/s \d+ eta \d+s")
EVAL_S = 0.4


class Records:
    def __init__(self):
        self.rows = []

    def log(self, record):
        self.rows.append(record)

    def summary(self, summary):
        pass


def test_step_time_and_throughput_leave_out_evaluation(tmp_path):
    """An evaluation that takes 0.4 s at step 2 must not show in the window of steps 3-4: without the fix the
    record of step 4 had step_time ~0.2 s (0.4 s over 2 steps) on a model whose steps take well under 10 ms."""
    cfg = resolve_config(task="xor", run={"steps": 4, "out": str(tmp_path), "log_every": 2, "eval_every": 2})
    job = build_job(cfg, 0, 1)
    slow = job.model.metric_sums

    def metric_sums(batch):
        time.sleep(EVAL_S)
        return slow(batch)
    job.model.metric_sums = metric_sums
    sink = Records()
    Trainer(job, LocalCommunicator(), sink).run()
    train = [r for r in sink.rows if "eval" not in r]
    assert [r["step"] for r in train] == [2, 4]
    assert train[1]["step_time"] < EVAL_S / 8, train[1]
    assert train[1]["tokens_per_s"] > 2 * 32 / (EVAL_S / 4)
    assert train[1]["time"] > EVAL_S  # the wall clock still counts it


def test_console_eta_is_training_steps_left_times_the_training_step_time():
    c = Console(100, "text", stream=_Null())
    c.log({"step": 10, "loss": 1.0, "lr": 0.1, "tokens_per_s": 10.0, "step_time": 0.2})
    assert c.eta_s(10) == pytest.approx(90 * 0.2)
    c.log({"step": 20, "loss": 1.0, "lr": 0.1, "tokens_per_s": 10.0, "step_time": 0.4})
    assert c.eta_s(20) == pytest.approx(80 * 0.3)


class _Null:
    def write(self, s):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def test_piped_lines_have_the_same_fields_for_a_local_and_an_aggregated_record():
    local = {"step": 50, "loss": 0.5257, "lr": 0.05, "time": 1.0, "grad_norm": 0.3, "tokens_per_s": 76506.0,
             "step_time": 0.01}
    aggregated = {**local, "loss_sum": 10.0, "count": 19.0, "comm_time": 0.002, "comm_share": 0.2,
                  "rank_step_s": {"0": 0.01, "1": 0.011}, "reporting_ranks": 1}
    a, b = format_step_line(local, 200, 1.5), format_step_line(aggregated, 200, 1.5)
    assert a == b == "step 50/200: loss 0.5257 lr 0.05 tok/s 76506 eta 2s"
    assert format_step_line(local, 200, 1.5, val_loss=0.61) == \
        "step 50/200: loss 0.5257 val 0.6100 lr 0.05 tok/s 76506 eta 2s"


def _train_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.fullmatch, text.splitlines()) if m]


def test_local_and_mpi_print_the_same_fields(tmp_path, capsys, mpi_ok):
    args = ["train", "--task", "xor", "--steps", "20", "--set", "run.log_every=5", "--set", "run.eval_every=10"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    local = capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "mpi"), "--backend", "mpi", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    for text in (local, out):
        lines = _train_lines(text)
        assert [int(m.group(1)) for m in lines] == [5, 10, 15, 20] and {m.group(2) for m in lines} == {"20"}, text
        assert lines[2].group(3) and not lines[0].group(3)  # the eval at step 10 shows from then on
        assert "step 10/20: eval loss " in text
    assert "--resume" not in err


def test_a_successful_json_mode_mpi_run_prints_no_resume_hint(tmp_path, capsys, mpi_ok):
    """launch_mpi printed 'continue the run ... --resume' after every JSON-mode run, failed or not."""
    assert main(["train", "--task", "xor", "--steps", "5", "--backend", "mpi", "--workers", "2", "--log-format",
                 "json", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 5
    assert {e["event"] for e in events} >= {"train", "eval", "done"}
    assert "--resume" not in err
