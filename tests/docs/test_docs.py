"""The docs run: every ```python block of README.md and docs/*.md executes, in order, in one namespace per file.

A block preceded by `<!-- no-test -->` is skipped; a ```bash block preceded by `<!-- run -->` is run with bash
(`set -e`) in a temporary directory holding `input.txt` (a tiny generated play, for the README's language-model
tour), with the venv's bin first on PATH; `<!-- run-slow -->` bash blocks (MPI, Ray
launches) run the same way under @pytest.mark.slow. Global registries a doc may extend (the model registry, the
module hooks) are restored after each file. A failure names the doc file, the block
number and the line where the block starts. docs/architecture.md additionally has its "where it lives" table
checked: every file it names exists and defines every name listed beside it.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(no-test|run|run-slow)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    mark: str | None  # "no-test", "run" or None
    index: int  # 1-based number among the blocks of its language


def extract_blocks(text: str) -> list[Block]:
    """Fenced blocks in order, each with the marker comment on the last non-blank line before its fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    counts: dict[str, int] = {}
    i = 0
    last_nonblank = ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            lang, start = m.group(1), i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"unclosed ``` block opened at line {start + 1}")
            mark = MARK.match(last_nonblank.strip())
            counts[lang] = counts.get(lang, 0) + 1
            blocks.append(Block(lang, "\n".join(body) + "\n", start + 1, mark.group(1) if mark else None,
                                counts[lang]))
            last_nonblank = "```"
        elif lines[i].strip():
            last_nonblank = lines[i]
        i += 1
    return blocks


def test_extract_blocks_sees_markers_and_numbers():
    text = ("x\n```python\na = 1\n```\n\n<!-- no-test -->\n```python\nb = 2\n```\n"
            "<!-- run -->\n\n```bash\nls\n```\n```text\nout\n```\n<!-- run-slow -->\n```bash\nmpi\n```\n")
    blocks = extract_blocks(text)
    assert [(b.lang, b.mark, b.index, b.line) for b in blocks] == [
        ("python", None, 1, 2), ("python", "no-test", 2, 7), ("bash", "run", 1, 12), ("text", None, 1, 15),
        ("bash", "run-slow", 2, 19)]
    assert blocks[1].code == "b = 2\n"


def test_docs_exist():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "architecture.md", "tutorial.md", "adding-a-layer.md", "performance.md"} <= names, names


def tiny_play(lines: int = 240, seed: int = 0) -> str:
    """A few KB of Shakespeare-shaped text (speaker lines, verse, blank lines): what the README's LM tour imports
    as input.txt, generated so the test needs no data set."""
    import random
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR LAURENCE"]
    words = ("but soft what light through yonder window breaks it is the east and juliet is the sun arise fair "
             "kill the envious moon who is already sick and pale with grief").split()
    out = []
    for _ in range(lines // 3):
        out += [rng.choice(names) + ":", " ".join(rng.choice(words) for _ in range(rng.randint(5, 10))).capitalize()
                + rng.choice([".", ",", "!", "?"]), ""]
    return "\n".join(out)


def test_readme_tour_runs_the_language_model_path():
    blocks = [b for b in extract_blocks((ROOT / "README.md").read_text()) if b.lang == "bash" and b.mark == "run"]
    lm = [b for b in blocks if "--task shakespeare" in b.code]
    assert lm, "README.md: the language-model tour block is not marked <!-- run -->"
    for step in ("data import --text input.txt --val-fraction", "train --task shakespeare --data", "eval --run",
                 "generate --run"):
        assert step in lm[0].code, step


@pytest.mark.parametrize("doc", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_python_blocks_run(doc: Path, capsys):
    from ndtrain.engine import module as engine_module
    from ndtrain.launch import models as registry
    registry.model_names()  # every family registered first: restoring an empty registry would lose them
    saved_models, saved_hooks = dict(registry._REGISTRY), list(engine_module._HOOKS)
    try:
        ran = _run_python_blocks(doc, capsys)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved_models)
        engine_module._HOOKS[:] = saved_hooks
    if doc.name in ("tutorial.md", "adding-a-layer.md"):
        assert ran > 0, f"{doc.name}: no python block ran"


def _run_python_blocks(doc: Path, capsys) -> int:
    namespace: dict = {"__name__": f"docs.{doc.stem}"}
    ran = 0
    for b in extract_blocks(doc.read_text()):
        if b.lang != "python" or b.mark == "no-test":
            continue
        where = f"{doc.relative_to(ROOT)}, python block {b.index} (line {b.line})"
        try:
            code = compile(b.code, f"<{where}>", "exec")
            exec(code, namespace)
        except Exception:
            out = capsys.readouterr().out
            pytest.fail(f"{where} failed:\n{traceback.format_exc()}\n--- block output ---\n{out[-3000:]}",
                        pytrace=False)
        ran += 1
    return ran


def _bash_env() -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


RUN_BLOCKS = [pytest.param(doc, b, id=f"{doc.name}-bash{b.index}",
                           marks=[pytest.mark.slow] if b.mark == "run-slow" else [])
              for doc in DOC_FILES for b in extract_blocks(doc.read_text())
              if b.lang == "bash" and b.mark in ("run", "run-slow")]


@pytest.mark.parametrize("doc,block", RUN_BLOCKS)
def test_marked_bash_blocks_run(doc: Path, block: Block, tmp_path):
    where = f"{doc.relative_to(ROOT)}, bash block {block.index} (line {block.line})"
    (tmp_path / "input.txt").write_text(tiny_play())
    proc = subprocess.run(["bash", "-e", "-c", block.code], cwd=tmp_path, env=_bash_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, (f"{where} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-3000:]}")


# -- architecture.md: the names it cites exist ------------------------------------------------------------------------
TABLE_ROW = re.compile(r"^\|\s*`([\w/]+\.py)`\s*\|\s*(.*?)\s*\|")


def _defined_names(path: Path) -> set[str]:
    """Top-level functions/classes/assignments and Class.method names defined in a Python file."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{sub.name}")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def cited_names(text: str) -> list[tuple[str, list[str]]]:
    """Rows `| `path.py` | `Name`, `Class.method` ... |` of the docs' file tables."""
    rows = []
    for line in text.splitlines():
        m = TABLE_ROW.match(line)
        if m:
            rows.append((m.group(1), re.findall(r"`([\w.]+)`", m.group(2))))
    return rows


def test_architecture_cites_real_files_and_names():
    text = (DOCS / "architecture.md").read_text()
    rows = cited_names(text)
    assert len(rows) >= 10, "architecture.md: its file table was not found"
    problems = []
    for rel, names in rows:
        path = ROOT / rel
        if not path.is_file():
            problems.append(f"{rel}: no such file")
            continue
        defined = _defined_names(path)
        problems += [f"{rel}: {n} is not defined there" for n in names if n not in defined]
    # every backticked repository path anywhere in the text exists too
    for rel in set(re.findall(r"`((?:engine|data|cluster|launch|tests|configs)/[\w/.]+)`", text)):
        if not (ROOT / rel).exists():
            problems.append(f"{rel}: cited in the text, does not exist")
    assert not problems, "architecture.md is out of date:\n" + "\n".join(problems)
