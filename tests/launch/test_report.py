"""`ndtrain report` / write_report: the page is self-contained, its <img> tags hold real PNGs of the series the
records have, the summary and config are in it, distributed extras (per-rank step time, topology) appear when the
run directory has them, and a seq2seq Transformer gets an attention heat map."""
import base64
import json
import re

import pytest

from ndtrain.launch.cli import main
from ndtrain.launch.models import model_names
from ndtrain.launch.report import build_report, write_report
from ndtrain.launch.report.plots import per_rank_step_times, plot_specs
from ndtrain.launch.rundir import read_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def images(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in IMG.findall(page)}


@pytest.fixture(scope="module")
def xor_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xor") / "run"
    assert main(["train", "--task", "xor", "--model", "mlp", "--steps", "40", "--out", str(out), "-q",
                 "--set", "run.log_every=5", "--set", "run.eval_every=20"]) == 0
    return out


@pytest.fixture(scope="module")
def rev_run(tmp_path_factory):
    if "transformer" not in model_names():
        pytest.skip("the transformer adapter is not registered")
    out = tmp_path_factory.mktemp("rev") / "run"
    assert main(["train", "--task", "reverse", "--model", "transformer", "--steps", "6", "--batch-size", "8",
                 "--out", str(out), "-q", "--set", "model.d_model=16", "--set", "model.n_heads=2",
                 "--set", "model.d_ff=32", "--set", "model.n_enc_layers=1", "--set", "model.n_dec_layers=1",
                 "--set", "data.rows=80"]) == 0
    return out


def test_report_command_writes_a_self_contained_page(xor_run, capsys):
    assert main(["report", "--run", str(xor_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (xor_run / "report.html").read_text()
    imgs = images(page)
    assert {"loss", "eval", "lr", "throughput", "grad_norm", "step_time"} <= set(imgs)
    for name, png in imgs.items():
        assert png.startswith(PNG_MAGIC), name
        assert (xor_run / "plots" / f"{name}.png").read_bytes() == png  # the same files beside the page
    assert "<script" not in page and 'src="http' not in page and "<link" not in page  # nothing external
    s = read_summary(xor_run)
    assert 'id="summary"' in page and s["param_checksum"] in page and s["config_hash"] in page
    assert f"{s['eval']['loss']:.6g}" in page  # the final evaluation table
    assert 'model = "mlp"' in page  # the config
    assert "Attention" not in page  # not a seq2seq model


def test_write_report_returns_the_page_and_never_raises(tmp_path, capsys):
    d = tmp_path / "small"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "time": 0.1}) + "\n")
    assert write_report(d) == d / "report.html"
    assert list(images((d / "report.html").read_text())) == ["loss"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text("{not json\n")
    assert write_report(broken) is None  # a plotting problem never fails the finished run
    assert "metrics.jsonl:1" in capsys.readouterr().err


def test_plots_follow_the_records():
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "time": s * 0.1} for s in (1, 2, 3)]
    specs = plot_specs(rows)
    assert [p["name"] for p in specs] == ["loss", "lr"]  # no grad_norm, throughput, step time or eval records
    assert specs[0]["lines"][0][1:3] == ([1, 2, 3], [1.0, 0.5, 1 / 3])
    rows.append({"step": 3, "time": 0.3, "eval": {"loss": 0.5, "accuracy": 0.75}})
    rows.append({"step": 4, "loss": "nan", "lr": 0.1, "time": 0.4})  # rundir writes non-finite values as strings
    specs = {p["name"]: p for p in plot_specs(rows)}
    assert [ln[0] for ln in specs["loss"]["lines"]] == ["train", "val"]
    assert specs["loss"]["lines"][0][1] == [1, 2, 3]  # the nan is skipped
    assert specs["eval"]["lines"] == [("accuracy", [3], [0.75], {"marker": "o"})]


def test_per_rank_step_time_and_topology(tmp_path):
    d = tmp_path / "dist"
    d.mkdir()
    recs = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "time": s, "step_time": 0.02 * s,
             "rank_step_s": {"0": 0.01 * s, "1": 0.02 * s}} for s in (1, 2, 3, 4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "topology.json").write_text(json.dumps({"backend": "mpi", "world_size": 2, "hosts": ["a", "b"]}))
    (d / "ranks.json").write_text(json.dumps([{"rank": 0, "host": "a", "pid": 11}, {"rank": 1, "host": "b",
                                                                                        "pid": 22}]))
    per = per_rank_step_times(recs)
    assert sorted(per) == [0, 1] and per[1] == ([1, 2, 3, 4], [0.02, 0.04, 0.06, 0.08])
    assert main(["report", "--run", str(d)]) == 0
    page = (d / "report.html").read_text()
    assert "step_time" in images(page)
    assert 'id="topology"' in page and 'id="ranks"' in page and "mpi" in page and ">22<" in page
    assert "did not finish" in page  # no summary.json
    assert "No attention map" in page  # no checkpoint to restore: a note, not a failure


def test_failed_run_shows_its_error(tmp_path):
    d = tmp_path / "failed"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1, "time": 0.1}) + "\n" +
                                     json.dumps({"step": 2, "rank": 1, "error": "WorkerError: loss is nan",
                                                 "traceback": "Traceback ..."}) + "\n")
    page = build_report(d)
    assert "WorkerError: loss is nan" in page and "rank 1" in page


def test_seq2seq_report_has_an_attention_heat_map(rev_run):
    assert main(["report", "--run", str(rev_run)]) == 0
    page = (rev_run / "report.html").read_text()
    imgs = images(page)
    assert "attention" in imgs and imgs["attention"].startswith(PNG_MAGIC)
    assert "cross_attn" in page and "Cross-attention of the last decoder layer" in page
    assert "loss" in imgs


def test_report_bad_run_dir_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err
