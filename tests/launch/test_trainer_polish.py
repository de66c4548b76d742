"""`ndtrain train`'s finishing touches: report.html at the end (and how to skip it), a self-contained run directory
(task_info.json, tokenizer.json: eval/generate work with the data gone), capped evaluation (the same prefix on any
number of workers), the topology line, TensorBoard events, the console (live bar, plain lines, JSON events),
retain_freed_memory once per process, --print-config."""
import io
import json
import re
import shutil
import threading
import tomllib

import numpy as np
import pytest

from ndtrain.cluster import worker_process
from ndtrain.cluster.trainer import Trainer
from ndtrain.launch.job import build_job
from ndtrain.launch.task_data import eval_batches, eval_row_count, load_task_data
from ndtrain.data.info import TaskInfo
from ndtrain.data.loader import Loader
from ndtrain.launch.cli import main
from ndtrain.launch.config import Config, apply_overrides, validate
from ndtrain.launch.progress import Console
from ndtrain.launch.rundir import NullSink, read_metrics, train_events
from helpers.runs import TINY_LM, make_cfg, train
from helpers.tensorboard import tb_scalars
from helpers.threads import ThreadComm, ThreadGroup


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Report and TensorBoard off unless a test turns them on (they cost seconds per run)."""
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


XOR = ["--task", "xor", "--model", "mlp", "--steps", "20"]


# -- 1. report.html --------------------------------------------------------------------------------------------------
def test_report_written_at_the_end_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("NDTRAIN_REPORT")
    out = train(tmp_path / "r", *XOR)
    page = (out / "report.html").read_text()
    assert "<html" in page.lower() and "xor" in page


@pytest.mark.parametrize("how", [["--no-report"], ["--set", "run.report=false"]])
def test_report_can_be_skipped(tmp_path, monkeypatch, how):
    monkeypatch.delenv("NDTRAIN_REPORT")
    out = train(tmp_path / "r", *XOR, *how)
    assert (out / "summary.json").is_file() and not (out / "report.html").exists()


def test_report_env_switch(tmp_path):
    out = train(tmp_path / "r", *XOR)  # NDTRAIN_REPORT=0 (fixture)
    assert (out / "summary.json").is_file() and not (out / "report.html").exists()


# -- 2. self-contained run directory ---------------------------------------------------------------------------------
def test_task_info_written_and_in_checkpoint(tmp_path):
    out = train(tmp_path / "r", *XOR)
    info, _, _ = load_task_data(validate(apply_overrides(Config(), ["run.task=xor"])))
    saved = json.loads((out / "task_info.json").read_text())
    assert saved == info.to_dict() and TaskInfo(**saved).kind == "classification"
    assert not (out / "tokenizer.json").exists()  # no text, no tokenizer
    from ndtrain.cluster import checkpoint as ckpt
    assert ckpt.load(out / "checkpoints").meta["task_info"] == info.to_dict()


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    for split, n in (("train", 100), ("val", 30)):
        (root / f"{split}.txt").write_text("".join(" ".join(rng.choice(words, 6)) + "\n" for _ in range(n)))
    data = root / "data"
    assert main(["data", "import", "--text", str(root / "train.txt"), "--block-size", "16",
                 "--out", str(data / "train")]) == 0
    assert main(["data", "import", "--text", str(root / "val.txt"), "--block-size", "16", "--tokenizer-file",
                 str(data / "train" / "tokenizer.json"), "--out", str(data / "val")]) == 0
    return data


def test_eval_and_generate_work_after_the_data_is_deleted(tmp_path, lm_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(lm_data, data)
    keep = tmp_path / "data_copy"
    shutil.copytree(lm_data, keep)
    run = train(tmp_path / "run", "--model", "lm", "--set", f"data.dir={data}", "--steps", "6", "--batch-size", "8",
                *TINY_LM)
    assert (run / "tokenizer.json").read_text() == (lm_data / "train" / "tokenizer.json").read_text()
    gen = ["generate", "--run", str(run), "--max-len", "8", "the cat"]
    capsys.readouterr()
    assert main(gen) == 0
    before = capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--json", "--data", str(keep)]) == 0
    ev_before = json.loads(capsys.readouterr().out)

    shutil.rmtree(data)  # the run directory alone must now rebuild model, task and tokenizer
    assert main(gen) == 0
    assert capsys.readouterr().out == before and before.strip()
    assert main(["eval", "--run", str(run), "--json", "--data", str(keep)]) == 0
    ev_after = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in ev_after.items() if k != "seconds"} == \
        {k: v for k, v in ev_before.items() if k != "seconds"}
    from ndtrain.launch.restore import load_run
    r = load_run(run)
    assert r.tokenizer is not None and r.info.to_dict() == json.loads((run / "task_info.json").read_text())


# -- 3. capped evaluation --------------------------------------------------------------------------------------------
def _cfg(tmp_path, *sets, workers=1):
    return make_cfg(tmp_path, "run.task=spirals", "run.model=mlp", "run.batch_size=12", *sets, workers=workers)


@pytest.mark.parametrize("cap", [0, 1, 37, 10_000])
def test_eval_rows_is_a_fixed_prefix_on_any_world(tmp_path, cap):
    cfg1 = _cfg(tmp_path, f"run.eval_rows={cap}", "run.eval_batch_size=5")
    _, _, val = load_task_data(cfg1)
    n = eval_row_count(val, cfg1)
    assert n == (min(cap, val.n_rows()) if cap else val.n_rows())
    want = val.batch(np.arange(n))["x"]
    for world in (1, 2, 3):
        cfg = _cfg(tmp_path, f"run.eval_rows={cap}", "run.eval_batch_size=5", workers=world)
        xs = [[b["x"] for b in eval_batches(val, cfg, r, world)] for r in range(world)]
        # concatenating the ranks' shares batch by batch gives the prefix, in order, each row once
        got = np.concatenate([x for k in range(max(map(len, xs))) for r in range(world) if k < len(xs[r])
                              for x in [xs[r][k]]])
        np.testing.assert_array_equal(got, want)
    if cap == 0:  # the uncapped order is Loader.for_eval's
        loader = Loader.for_eval(val, 5, 0, 1)
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in loader]), want)


def _evaluate_on(tmp_path, world, *sets):
    group, results = ThreadGroup(world), [None] * world

    def rank(r):
        cfg = _cfg(tmp_path, *sets, workers=world)
        t = Trainer(build_job(cfg, r, world), ThreadComm(group, r), NullSink())
        _, _, val = load_task_data(cfg)
        sums = {}
        for b in eval_batches(val, cfg, r, world):
            for k, v in t.model.metric_sums(b).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        results[r] = (sums, t.evaluate())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    return results


def test_eval_rows_exact_counts_and_same_metrics_for_w_1_2(tmp_path):
    sets = ("run.eval_rows=23", "run.eval_batch_size=4")
    (one_sums, one), = _evaluate_on(tmp_path, 1, *sets)
    two = _evaluate_on(tmp_path, 2, *sets)
    assert one_sums["count"] == 23 and sum(s["count"] for s, _ in two) == 23  # exactly the capped rows
    assert sum(s["correct"] for s, _ in two) == one_sums["correct"]
    assert two[0][1] == two[1][1]  # every rank reports the same figures
    assert two[0][1]["accuracy"] == one["accuracy"] and two[0][1]["loss"] == pytest.approx(one["loss"], rel=1e-6)


# -- 4. topology, TensorBoard, console ------------------------------------------------------------------------------
def test_topology_line_and_file(tmp_path, capsys):
    out = train(tmp_path / "r", *XOR, "--batch-size", "16", "--threads", "1")
    err = capsys.readouterr().err
    assert "ndtrain: backend local: 1 rank on " in err
    assert "1 BLAS thread(s) per rank, batch 16 global = 16 per rank" in err
    topo = json.loads((out / "topology.json").read_text())
    assert topo["backend"] == "local" and topo["ranks"] == 1 and topo["per_rank_batch"] == 16


def test_tensorboard_events_match_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("NDTRAIN_TENSORBOARD")
    out = train(tmp_path / "r", *XOR, "--set", "run.log_every=5")
    scalars = tb_scalars(out / "tb")
    tr = train_events(read_metrics(out))
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in tr] == [5, 10, 15, 20]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in tr], rtol=1e-6)
    assert "eval/accuracy" in scalars and "train/lr" in scalars
    assert not (train(tmp_path / "off", *XOR, "--set", "run.tensorboard=false") / "tb").exists()


def test_json_log_format_one_object_per_event(tmp_path, capsys):
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["train", "--out", str(out), *XOR, "--set", "run.log_every=5", "--log-format", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    kinds = [e["event"] for e in events]
    assert kinds == ["topology", "train", "train", "train", "train", "eval", "done"]
    tr = [e for e in events if e["event"] == "train"]
    recs = train_events(read_metrics(out))
    for e, r in zip(tr, recs):
        assert {k: v for k, v in e.items() if k not in ("event", "total_steps", "eta_s")} == r
        assert e["total_steps"] == 20
    assert tr[-1]["eta_s"] == 0.0
    assert events[-1]["steps"] == 20 and events[-1]["run_dir"] == str(out)
    assert set(recs[0]) == set(json.loads((out / "metrics.jsonl").read_text().splitlines()[0]))  # unchanged


def test_text_mode_plain_lines_and_quiet(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), *XOR, "--set", "run.log_every=10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 10/20: loss \d\.\d{4} lr 0\.05 tok/s \d+ eta \d+s", out[0]), out[0]
    assert out[2].startswith("step 20/20: eval loss ") and out[-1].startswith("done: 20 steps")
    assert main(["train", "--out", str(tmp_path / "b"), *XOR, "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("done: ")  # --quiet: no progress lines


def test_console_live_bar_shows_step_total_loss_lr_eta():
    out, err = io.StringIO(), io.StringIO()
    c = Console(100, "text", bar=True, stream=out, err_stream=err)
    for step in range(50):
        c.progress(step)
    c.log({"step": 50, "loss": 0.25, "lr": 0.001, "time": 1.0, "tokens_per_s": 1234.0, "step_time": 0.5})
    c.log({"step": 50, "time": 1.0, "eval": {"loss": 0.5, "accuracy": 0.75}})
    c.close()
    text = err.getvalue()
    assert "50/100" in text and "loss=0.25" in text and "lr=0.001" in text and "tok/s=1234" in text
    assert "eta=25s" in text  # 50 steps left at 0.5 s per training step
    assert "val=0.5" in text  # the last validation loss beside the training loss
    assert "step 50/100: eval loss 0.5000 accuracy 0.7500" in text and out.getvalue() == ""


def test_console_bar_off_when_not_a_tty_or_quiet():
    assert not Console(10, stream=io.StringIO()).use_bar  # StringIO is no terminal
    assert not Console(10, quiet=True, bar=True).use_bar
    assert not Console(10, "json", bar=True).use_bar
    with pytest.raises(ValueError, match="--log-format"):
        Console(10, "yaml")


# -- 5. retain_freed_memory once per process ------------------------------------------------------------------------
def test_retain_freed_memory_called_once_per_process(tmp_path, monkeypatch):
    import ndtrain.engine.memory as memory
    calls = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(worker_process, "_MEMORY_SET", False)  # set_up_process_memory's flag
    train(tmp_path / "a", *XOR)
    train(tmp_path / "b", *XOR)
    assert calls == [1]


# -- 6. --print-config ----------------------------------------------------------------------------------------------
def test_print_config_prints_resolved_toml_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--task", "spirals", "--out", str(out), "--set", "run.eval_rows=7", "--print-config"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["run"]["task"] == "spirals" and cfg["run"]["eval_rows"] == 7 and cfg["run"]["report"] is True
    assert cfg["run"]["out"] == str(out) and not out.exists()
