"""The run-directory writer: one JSON line per event, an atomically replaced summary with the required keys."""
import json

import numpy as np
import pytest

from ndtrain.launch.rundir import RunWriter, eval_events, read_metrics, read_summary, train_events


def test_writer_contract(tmp_path):
    with RunWriter(tmp_path / "r") as w:
        w.log({"step": 1, "loss": np.float32(0.5), "lr": 1e-3, "time": 0.1})
        w.log({"step": 1, "time": 0.2, "eval": {"accuracy": np.float64(0.75)}})
        w.log({"step": 2, "loss": float("nan"), "lr": 1e-3, "time": 0.3})
        w.summary({"steps": 2, "wall_s": 0.3, "final_loss": 0.5, "eval": {"accuracy": 0.75}})
    rows = read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert train_events(rows)[0]["loss"] == 0.5 and eval_events(rows)[0]["eval"]["accuracy"] == 0.75
    assert rows[2]["loss"] == "nan"  # strict JSON: no bare NaN
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert read_summary(tmp_path / "r")["eval"] == {"accuracy": 0.75}
    assert (tmp_path / "r" / "checkpoints").is_dir()
    assert not list((tmp_path / "r").glob(".*"))


def test_writer_rejects_incomplete_records(tmp_path):
    w = RunWriter(tmp_path)
    with pytest.raises(ValueError, match="step"):
        w.log({"loss": 1.0})
    with pytest.raises(ValueError, match="final_loss"):
        w.summary({"steps": 1, "wall_s": 1.0, "eval": {}})
    w.close()


# -- where a run writes (issue #16) -------------------------------------------------------------------------------------
def test_run_outputs_are_cleared_and_nothing_else(tmp_path):
    from ndtrain.launch.rundir import RUN_OUTPUTS, clear_run_outputs
    for name in RUN_OUTPUTS:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    (tmp_path / "mine.txt").write_text("keep")
    assert sorted(clear_run_outputs(tmp_path)) == sorted(RUN_OUTPUTS)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_non_empty_directory_is_refused_unless_resume_or_overwrite(tmp_path):
    from ndtrain.launch.rundir import RunDirError, check_run_dir_free
    check_run_dir_free(tmp_path / "new", resume=False, overwrite=False)
    check_run_dir_free(tmp_path, resume=False, overwrite=False)  # empty
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir_free(tmp_path, resume=False, overwrite=False)
    check_run_dir_free(tmp_path, resume=True, overwrite=False)
    check_run_dir_free(tmp_path, resume=False, overwrite=True)


def test_writability_check_leaves_nothing_behind(tmp_path):
    from ndtrain.launch.rundir import RunDirError, check_writable_dir
    check_writable_dir(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="cannot create"):
        check_writable_dir(tmp_path / "f" / "sub")
