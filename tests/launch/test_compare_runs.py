"""`ndtrain report --run A --run B` (one page comparing runs) and `ndtrain runs` (status of every run directory)."""
import base64
import json
import re
import shutil

import pytest

from ndtrain.launch.cli import main
from ndtrain.launch.report.compare import compare_page, config_differences
from ndtrain.launch.report.runinfo import find_runs, run_facts

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "0.05"), ("b", "0.01")):
        assert main(["train", "--task", "xor", "--steps", "40", "--out", str(root / name), "-q", "--lr", lr,
                     "--eval-every", "20", "--log-every", "5", "--no-report"]) == 0
    return root


def test_report_with_two_runs_writes_one_comparison_page(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["report", "--run", str(runs / "a"), "--run", str(runs / "b"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert "2 runs compared (a, b)" in page
    assert str((runs / "a").resolve()) in page and str((runs / "b").resolve()) in page
    # final metrics of both runs, from their summaries
    table = page[page.index('id="final-metrics"'):]
    table = table[:table.index("</table>")]
    for name in ("a", "b"):
        s = json.loads((runs / name / "summary.json").read_text())
        assert f"<td>{name}</td>" in table and f"{s['eval']['loss']:.4g}" in table
    # the config keys that differ: optim.lr only (run.out is left out)
    diff = page[page.index('id="config-diff"'):]
    diff = diff[:diff.index("</table>")]
    assert "<td>optim.lr</td><td>0.05</td><td>0.01</td>" in diff and "run.out" not in diff
    assert diff.count("<tr>") == 2  # the header and optim.lr
    # overlaid curves: loss, each eval metric and throughput, against step and wall-clock
    imgs = dict(IMG.findall(page))
    assert {"loss", "eval_loss", "eval_accuracy", "throughput"} <= set(imgs)
    assert all(base64.b64decode(v).startswith(b"\x89PNG") for v in imgs.values())
    assert "<script" not in page


def test_comparison_curves_have_one_line_per_run_in_both_panels(runs):
    from ndtrain.launch.report.compare import comparison_specs, run_labels
    paths = [runs / "a", runs / "b"]
    specs = {s["name"]: s for s in comparison_specs([run_facts(p) for p in paths], run_labels(paths))}
    for name in ("loss", "eval_accuracy", "throughput"):
        by_step, by_time = specs[name]["panels"]
        assert [ln[0] for ln in by_step["lines"]] == ["a", "b"] == [ln[0] for ln in by_time["lines"]]
        assert by_step["xlabel"] == "step" and "seconds" in by_time["xlabel"]
        assert by_time["lines"][0][1] == sorted(by_time["lines"][0][1])  # wall-clock grows


def test_config_differences():
    a = {"run": {"out": "x", "steps": 10}, "optim": {"lr": 0.1, "schedule_kwargs": {}}, "model": {"hidden": [4]}}
    b = {"run": {"out": "y", "steps": 10}, "optim": {"lr": 0.1, "schedule_kwargs": {"warmup_steps": 5}},
         "model": {"hidden": [8], "dropout": 0.1}}
    assert config_differences([a, b]) == [("optim.schedule_kwargs", [{}, {"warmup_steps": 5}]),
                                          ("model.hidden", [[4], [8]]), ("model.dropout", [None, 0.1])]


def test_default_output_is_beside_the_runs(runs, capsys):
    assert main(["report", "--run", str(runs / "a"), "--run", str(runs / "b")]) == 0
    assert (runs / "compare.html").is_file()
    assert main(["report", "--run", str(runs / "a"), "--run", str(runs / "nope")]) == 2
    assert "nope: no such run directory" in capsys.readouterr().err


def _status_fixture(runs, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    shutil.copytree(runs / "a", root / "finished")
    shutil.copytree(runs / "a", root / "interrupted")
    (root / "interrupted" / "summary.json").unlink()  # stopped before the end: no summary, a checkpoint
    failed = root / "failed"
    shutil.copytree(runs / "b", failed)
    (failed / "summary.json").unlink()
    with open(failed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 41, "rank": 1, "error": "WorkerError: loss is nan"}) + "\n")
    (root / "not-a-run").mkdir()
    nested = root / "group" / "deep"
    shutil.copytree(runs / "a", nested)
    return root


def test_runs_lists_status(runs, tmp_path, capsys):
    root = _status_fixture(runs, tmp_path)
    assert [p.name for p in find_runs(root)] == ["failed", "finished", "deep", "interrupted"]  # group/deep
    facts = {p.name: run_facts(p) for p in find_runs(root)}
    assert facts["finished"].status == "finished" and facts["deep"].status == "finished"
    assert facts["interrupted"].status == "interrupted" and facts["interrupted"].note == "resumable from step 40"
    assert facts["failed"].status == "failed" and "rank 1: WorkerError: loss is nan" in facts["failed"].note
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["run", "status", "task", "model", "steps"]
    line = {ln.split()[0].split("/")[-1]: ln for ln in out[1:]}
    assert set(line) == {"failed", "finished", "interrupted", "deep"}
    assert line["finished"].split()[1:5] == ["finished", "xor", "mlp", "40/40"] and "acc 1" in line["finished"]
    assert line["interrupted"].split()[1] == "interrupted" and "resumable from step 40" in line["interrupted"]
    assert line["failed"].split()[1] == "failed"
    assert main(["runs", str(root), "--json"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["run"].split("/")[-1]: r["status"] for r in recs} == {
        "failed": "failed", "finished": "finished", "interrupted": "interrupted", "deep": "finished"}


def test_runs_bad_dir_exit_2(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such directory" in err
    assert main(["runs", str(tmp_path)]) == 0
    assert "no run directories" in capsys.readouterr().out


def test_single_run_report_out(runs, tmp_path):
    out = tmp_path / "one.html"
    assert main(["report", "--run", str(runs / "a"), "--out", str(out), "--no-samples"]) == 0
    assert "ndtrain run a" in out.read_text() and 'id="summary"' in out.read_text()
    assert main(["report", "--run", str(runs / "a"), "--out", str(tmp_path / "no" / "x.html")]) == 2
