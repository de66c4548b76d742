"""The report of an elastic / distributed run, on synthetic run directories: the workers-over-steps plot appears only
when the rank group changed (membership events, or train records whose world_size varies), the tables of membership
changes and stragglers list each event, and the comparison page counts them per run."""
import json

from ndtrain.launch.report import build_report
from ndtrain.launch.report.compare import compare_page
from ndtrain.launch.report.plots import plot_specs, world_size_lines
from ndtrain.launch.rundir import train_events

SHRINK = {"event": "membership", "step": 10, "change": "shrink", "world_size": 2, "previous_world_size": 3,
          "rank": 2, "host": "laptop-c", "reason": "its process ended (killed)", "recovery_s": 1.234}
GROW = {"event": "membership", "step": 30, "change": "grow", "world_size": 3, "previous_world_size": 2,
        "rank": 2, "host": "laptop-c", "reason": "a Ray node joined", "recovery_s": 2.5}
STRAGGLER = {"event": "straggler", "rank": 1, "host": "laptop-b", "step": 21, "compute_s": 0.052,
             "median_s": 0.013, "factor": 4.0}


def _train(step, w):
    return {"step": step, "loss": 1.0 / step, "lr": 0.1, "time": step * 0.1, "step_time": 0.05, "world_size": w}


def _run_dir(path, rows, summary=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _elastic_rows():
    rows = [_train(s, 3) for s in (5, 10)] + [SHRINK] + [_train(s, 2) for s in (15, 20)] + [STRAGGLER]
    return rows + [_train(25, 2), GROW] + [_train(s, 3) for s in (35, 40)]


def test_workers_plot_and_tables_of_an_elastic_run(tmp_path):
    rows = _elastic_rows()
    summary = {"steps": 40, "wall_s": 4.0, "final_loss": 0.025, "eval": {}, "world_size": 3,
               "membership_changes": 2, "restarts": 0,
               "stragglers": [{"rank": 1, "host": "laptop-b", "first_step": 21, "factor": 4.0}]}
    d = _run_dir(tmp_path / "elastic", rows, summary)
    lines = world_size_lines(rows)
    workers, shrinks, grows = lines
    # a step curve from the start (W=3 before the first change) to the last step, with each change on it
    assert workers[1][0] == 0 and workers[1][-1] == 40 and workers[3]["drawstyle"] == "steps-post"
    assert dict(zip(workers[1], workers[2]))[10] == 2 and dict(zip(workers[1], workers[2]))[30] == 3
    assert workers[2][0] == 3 and min(workers[2]) == 2
    assert (shrinks[1], shrinks[2]) == ([10], [2]) and (grows[1], grows[2]) == ([30], [3])
    assert "world_size" in [s["name"] for s in plot_specs(rows)]
    assert all("event" not in r for r in train_events(rows)) and len(train_events(rows)) == 7

    page = build_report(d, attention=False, samples=False)
    assert 'alt="world_size"' in page and "Workers and stragglers" in page
    assert 'id="membership"' in page and 'id="stragglers"' in page
    for text in ("3 → 2", "2 → 3", "laptop-c", "its process ended (killed)", "1.23 s", "a Ray node joined"):
        assert text in page, text
    assert "laptop-b" in page and "52.0 ms" in page and "13.0 ms" in page and "4.0x" in page
    assert "Membership changes (workers that left or joined)" in page  # the summary in words
    assert "rank 1 on laptop-b from step 21" in page


def test_no_change_no_workers_plot_and_no_section(tmp_path):
    rows = [_train(s, 2) for s in (5, 10, 15)]
    assert world_size_lines(rows) == []
    names = [s["name"] for s in plot_specs(rows)]
    assert "world_size" not in names and "loss" in names
    page = build_report(_run_dir(tmp_path / "steady", rows, {"steps": 15, "wall_s": 1.0, "final_loss": 0.1,
                                                              "eval": {}, "stragglers": []}),
                        attention=False, samples=False)
    assert 'alt="world_size"' not in page and "Workers and stragglers" not in page


def test_world_size_that_varies_without_events_is_plotted_and_summary_stragglers_are_listed(tmp_path):
    """A run resumed on another number of workers (MPI: --resume RUN --workers K) has no membership events, but
    its train records say W changed; stragglers only in summary.json (a record file cut short) are still shown."""
    rows = [_train(s, 2) for s in (5, 10)] + [_train(s, 1) for s in (15, 20)]
    workers = world_size_lines(rows)[0]
    assert workers[1] == [5, 10, 15, 20] and workers[2] == [2, 2, 1, 1]
    d = _run_dir(tmp_path / "resumed", rows, {"steps": 20, "wall_s": 1.0, "final_loss": 0.1, "eval": {},
                                               "stragglers": [{"rank": 0, "host": "h0", "first_step": 7,
                                                               "factor": 2.5}]})
    page = build_report(d, attention=False, samples=False)
    assert 'alt="world_size"' in page and 'id="stragglers"' in page and "2.5x" in page
    assert 'id="membership"' not in page


def test_comparison_counts_membership_changes_and_stragglers(tmp_path):
    a = _run_dir(tmp_path / "a", _elastic_rows(), {"steps": 40, "wall_s": 4.0, "final_loss": 0.025, "eval": {},
                                                     "membership_changes": 2, "stragglers": [{"rank": 1,
                                                     "host": "b", "first_step": 21, "factor": 4.0}]})
    b = _run_dir(tmp_path / "b", [_train(s, 1) for s in (5, 10)], {"steps": 10, "wall_s": 1.0,
                                                                     "final_loss": 0.1, "eval": {}})
    page = compare_page([a, b])
    assert "<th>membership changes</th>" in page and "<th>stragglers named</th>" in page
    row_a = page.split("<td>a</td>", 1)[1].split("</tr>", 1)[0]
    row_b = page.split("<td>b</td>", 1)[1].split("</tr>", 1)[0]
    assert row_a.endswith("<td>2</td><td>1</td>") and row_b.endswith("<td>-</td><td>-</td>")
    plain = compare_page([b, b])
    assert "membership changes" not in plain  # runs that say nothing about it: no column
