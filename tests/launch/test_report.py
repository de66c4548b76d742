"""`ndtrain report` / write_report: the page is self-contained, its <img> tags hold real PNGs of the series the
records have, the summary and config are in it, distributed extras (per-rank step time, topology) appear when the
run directory has them, and a seq2seq Transformer gets an attention heat map."""
import base64
import json
import re

import pytest

from ndtrain.launch.cli import main
from ndtrain.launch.report import build_report, write_report
from ndtrain.launch.report.plots import draw, per_rank_step_times, plot_specs, to_png
from ndtrain.launch.rundir import read_summary
from helpers.runs import TINY_LM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def images(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in IMG.findall(page)}


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
    assert f"{s['eval']['loss']:.4g}" in page  # the final evaluation table
    assert 'title="wall_s">Training wall time<' in page and "mean_comm_share" not in page  # keys in words
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
    assert specs[0]["panels"][0]["lines"][0][1:3] == ([1, 2, 3], [1.0, 0.5, 1 / 3])
    rows.append({"step": 3, "time": 0.3, "eval": {"loss": 0.5, "accuracy": 0.75}})
    rows.append({"step": 4, "loss": "nan", "lr": 0.1, "time": 0.4})  # rundir writes non-finite values as strings
    specs = {p["name"]: p for p in plot_specs(rows)}
    loss_lines = specs["loss"]["panels"][0]["lines"]
    assert [ln[0] for ln in loss_lines] == ["train", "validation"]
    assert loss_lines[0][1] == [1, 2, 3]  # the nan is skipped
    assert [p["lines"] for p in specs["eval"]["panels"]] == [[("accuracy", [3], [0.75], {"marker": "o"})]]


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


# -- the report reads right (issue 17) --------------------------------------------------------------------------------
def demo_eval_rows():
    """The demo's records: exact match 1.0 with a 1e-5 wobble (which gave a shared axis a `1e-5+1` offset) beside
    token accuracy, BLEU, and the eval loss."""
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "time": 0.5 * s, "tokens_per_s": 123456.0 + s} for s in
            range(1, 41)]
    for s, em in ((10, 1.0), (20, 0.99999), (30, 1.0), (40, 1.0)):
        rows.append({"step": s, "time": 0.5 * s, "eval": {"loss": 0.1 / s, "exact_match": em,
                                                          "token_accuracy": 0.9 + s / 1000, "perplexity": 1.01}})
    return rows


def test_eval_plot_has_one_axis_per_metric_and_no_offset():
    spec = {p["name"]: p for p in plot_specs(demo_eval_rows())}["eval"]
    fig = draw(spec)
    to_png(fig)  # tick labels and offsets are computed when the figure is drawn
    assert len(fig.axes) == 3  # exact match, token accuracy, perplexity: each its own axes
    assert [ax.get_title() for ax in fig.axes] == ["exact match", "token accuracy", "perplexity"]
    for ax in fig.axes:
        assert ax.yaxis.get_major_formatter().get_offset() == "", ax.get_title()
        assert ax.xaxis.get_major_formatter().get_offset() == "", ax.get_title()
        assert ax.get_ylabel() == ax.get_title()
        assert len(ax.get_lines()) == 1
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and not any("e" in t.lower() for t in labels), labels  # plain numbers
    em = fig.axes[0]
    lo, hi = em.get_ylim()
    assert lo <= 0.98 and hi >= 1.0  # 1.0 is drawn near a tick that reads ~1, not at a "0.0" tick
    ticks = [float(t.get_text().replace("\u2212", "-")) for t in em.get_yticklabels() if t.get_text()]
    assert any(abs(t - 1.0) < 1e-9 for t in ticks), ticks


def test_every_plot_is_labelled_and_throughput_has_no_multiplier():
    for spec in plot_specs(demo_eval_rows()):
        fig = draw(spec)
        to_png(fig)
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), spec["name"]
            if spec.get("legend", True):
                assert ax.get_legend() is not None, spec["name"]  # single-series plots too
            assert ax.yaxis.get_major_formatter().get_offset() == "", spec["name"]
    tp = {p["name"]: p for p in plot_specs(demo_eval_rows())}["throughput"]["panels"][0]
    assert tp["ylabel"] == "tokens / s (all ranks)"


def test_bleu_over_step_and_wall_clock_with_and_without_wall_time():
    base = [{"step": s, "loss": 1.0, "lr": 1e-3, "time": float(s)} for s in (1, 2, 3)]
    without = base + [{"step": s, "time": 10.0 * s, "eval": {"loss": 1.0, "bleu": 5.0 * s}} for s in (1, 2, 3)]
    spec = {p["name"]: p for p in plot_specs(without)}["bleu"]
    by_step, by_time = spec["panels"]
    assert by_step["lines"][0][1:3] == ([1, 2, 3], [5.0, 10.0, 15.0])
    assert by_time["lines"][0][1:3] == ([10.0, 20.0, 30.0], [5.0, 10.0, 15.0]) and "seconds" in by_time["xlabel"]
    # eval14's events carry wall_time (seconds since start, eval included); an epoch timestamp counts from the first
    with_wall = base + [{"step": s, "time": 10.0 * s, "wall_time": 12.0 * s, "eval": {"bleu": 5.0 * s}}
                        for s in (1, 2, 3)]
    spec = {p["name"]: p for p in plot_specs(with_wall)}["bleu"]
    assert spec["panels"][1]["lines"][0][1] == [12.0, 24.0, 36.0]
    epoch = base + [{"step": s, "time": 1.0, "wall_time": 1.7e9 + 12.0 * s, "eval": {"bleu": 1.0}} for s in (1, 2)]
    assert {p["name"]: p for p in plot_specs(epoch)}["bleu"]["panels"][1]["lines"][0][1] == [0.0, 12.0]
    eval_spec = {p["name"]: p for p in plot_specs(without)}.get("eval")
    assert eval_spec is None  # BLEU has its own figure; no other metric here


def test_page_layout_fits_a_window():
    page = build_report_page_for(demo_eval_rows())
    assert "max-width: 100%" in page and 'class="grid"' in page and "grid-template-columns" in page


def build_report_page_for(rows, tmp=None):
    import tempfile
    from pathlib import Path
    d = Path(tmp or tempfile.mkdtemp()) / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_report(d)


def test_summary_in_words_with_units(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"steps": 1500, "wall_s": 75.2, "final_loss": 0.01, "params": 123456,
                                                "mean_comm_share": 0.0365355, "eval": {"exact_match": 1.0}}))
    page = build_report(d, attention=False, samples=False)
    assert "Time waiting on communication" in page and "3.7% of the step" in page
    assert "75.2 s (1 min 15 s)" in page and "123,456" in page and ">exact match<" in page
    assert "1.0000 (100.0%)" in page
    assert ">mean_comm_share<" not in page and "0.0365355" not in page


def test_seq2seq_report_shows_translations_beside_references(rev_run):
    page = build_report(rev_run, attention=False)
    assert 'id="samples"' in page and "<th>reference</th>" in page and "<th>model output</th>" in page
    assert page.count('<td class="text">') >= 3 * 2  # at least two rows of source, output, reference


def test_lm_report_continues_a_prompt(tmp_path):
    text = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(60))
    (tmp_path / "t.txt").write_text(text)
    data = tmp_path / "data"
    assert main(["data", "import", "--text", str(tmp_path / "t.txt"), "--val-fraction", "0.2", "--block-size", "32",
                 "--out", str(data)]) == 0
    out = tmp_path / "run"
    assert main(["train", "--task", "shakespeare", "--data", str(data), "--steps", "4", "--out", str(out), "-q",
                 *TINY_LM, "--set", "model.block_size=32", "--no-report"]) == 0
    page = build_report(out, attention=False)
    assert 'id="samples"' in page and "<th>prompt</th>" in page and "<th>continuation</th>" in page


def test_a_single_record_is_drawn_and_steps_are_integers():
    rows = [{"step": 30, "loss": 1.5, "lr": 1e-3, "time": 1.0, "grad_norm": 1.7}]
    for spec in plot_specs(rows):
        fig = draw(spec)
        to_png(fig)
        for ax in fig.axes:
            (line,) = ax.get_lines()
            assert line.get_marker() not in (None, "None", "", " "), spec["name"]  # visible without a segment
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert all(float(t).is_integer() for t in ticks), ticks
