"""One of each, read from the source: the run directory's file names are written in launch/rundir.py only, ranks
start through one entry (cluster/rank_entry.py start_rank), one rule picks BLAS threads per rank, and one module
formats step lines and the `done:` line (launch/progress.py)."""
from __future__ import annotations

import ast
from pathlib import Path

from ndtrain.cluster import rank_entry
from ndtrain.launch import rundir

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = sorted(p for layer in ("cluster", "launch") for p in (ROOT / layer).rglob("*.py"))
RUN_FILES = {rundir.CONFIG, rundir.METRICS, rundir.SUMMARY, rundir.CHECKPOINTS, rundir.TASK_INFO, rundir.TOKENIZER,
             rundir.TOPOLOGY, rundir.RANKS, rundir.TB_DIR, rundir.REPORT, rundir.PLOTS_DIR}


def _strings(path: Path):
    """(line, text) of every string constant and f-string head that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def _where(pred) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in PACKAGE for line, text in _strings(p) if pred(text)]


def test_run_directory_file_names_are_defined_in_rundir_only():
    found = [w for w in _where(lambda s: s in RUN_FILES or any(s.endswith("/" + n) for n in RUN_FILES))
             if not w.startswith("launch/rundir.py:")]
    assert not found, "\n".join(found)


def _fstrings(path: Path):
    """(line, the constant text of an f-string) for every f-string."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))


def test_done_and_step_lines_are_formatted_in_progress_only():
    """A `done:` line, or a step line showing the loss (the trainer, the coordinator and two CLI commands each
    printed their own before)."""
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in PACKAGE for line, text in [*_fstrings(p), *_strings(p)]
             if (text.startswith("done: ") or ("loss " in text and any(k in text for k in (" lr ", "tok/s", "items/s"))))
             and p.relative_to(ROOT) != Path("launch/progress.py")]
    assert not found, "\n".join(found)


def test_one_rank_entry_and_one_thread_rule():
    defs = {}
    for p in PACKAGE:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("default_threads", "train_target", "run_worker"):
                defs.setdefault(node.name, []).append(str(p.relative_to(ROOT)))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "RankContext":
                defs.setdefault("RankContext()", []).append(str(p.relative_to(ROOT)))
    assert defs == {"default_threads": ["cluster/worker_process.py"], "train_target": ["launch/worker.py"],
                    "run_worker": ["launch/worker.py"], "RankContext()": ["cluster/rank_entry.py"]}, defs
    assert rank_entry.start_rank.__module__ == "ndtrain.cluster.rank_entry"
