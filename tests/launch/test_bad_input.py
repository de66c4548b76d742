"""The bad-input table (issue #16): every way a user (or an edited file) can hand `ndtrain` bad input ends in ONE
line on stderr naming the culprit (file, field or path), exit status 2, no traceback, and nothing already written
changed: for the cases over an existing run or data set the whole tree is hashed before and after.

Each case is a function `case(w) -> Case` that builds what it needs in the workspace `w` (copies of a finished run
and an imported data set, made once per module) and returns the argv, the substrings the error line must contain,
the substrings it must NOT contain, and the tree that must stay byte-identical. The cases run the real CLI entry
point in-process (`ndtrain.launch.cli.main`, the function the console script calls); a few run the console script
in a subprocess as well (test_console_script_*).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ndtrain.launch.cli import main

XOR = ["train", "--task", "xor", "--model", "mlp", "--steps", "3", "-q"]


@dataclass
class Case:
    argv: list[str]
    says: list[str]  # substrings of the error line (the culprit, the reason)
    not_says: list[str] = field(default_factory=list)
    keep: Path | None = None  # a tree that must be byte-identical afterwards
    mid_run: bool = False  # fails after the run started: other lines (topology, numpy warnings) may precede
    rc: int = 2


# -- the workspace: a finished run and an imported LM data set, made once, copied per case ------------------------
@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_originals")
    text = root / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60)))
    data = root / "lm"
    assert main(["data", "import", "--text", str(text), "--out", str(data / "train"), "--block-size", "16"]) == 0
    assert main(["data", "import", "--text", str(text), "--out", str(data / "val"), "--block-size", "16",
                 "--tokenizer-file", str(data / "train" / "tokenizer.json")]) == 0
    run = root / "run"
    assert main([*XOR, "--out", str(run)]) == 0
    return {"text": text, "data": data, "run": run}


class Workspace:
    def __init__(self, tmp: Path, originals: dict):
        self.tmp, self._orig = tmp, originals
        self.text = originals["text"]

    def run(self) -> Path:
        """A copy of a finished 3-step xor run (config.toml, metrics.jsonl, summary.json, checkpoints/, ...)."""
        d = self.tmp / "run"
        if not d.exists():
            shutil.copytree(self._orig["run"], d)
        return d

    def data(self) -> Path:
        """A copy of an imported LM data set: DIR/train and DIR/val (char tokenizer, blocks of 16)."""
        d = self.tmp / "lm"
        if not d.exists():
            shutil.copytree(self._orig["data"], d)
        return d

    def checkpoint(self) -> Path:
        js = sorted((self.run() / "checkpoints").glob("ckpt-*.json"))
        return js[-1]

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and a marker per directory) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- helpers that damage a copy ---------------------------------------------------------------------------------------
def _edit_json(path: Path, edit, rehash: bool = False) -> Path:
    rec = json.loads(path.read_text())
    edit(rec)
    if rehash:  # an attacker recomputes the record's own hash: only the type checks can catch the edit
        from ndtrain.cluster.checkpoint import _record_digest
        rec["record_sha256"] = _record_digest(rec)
    path.write_text(json.dumps(rec))
    return path


def _resume(w: Workspace, js: Path) -> list[str]:
    return [*XOR, "--steps", "6", "--out", str(w.run()), "--resume", str(js)]


def _ckpt_case(edit, says, rehash=False):
    def case(w: Workspace) -> Case:
        js = _edit_json(w.checkpoint(), edit, rehash)
        return Case(_resume(w, js), [js.name, *says], keep=w.run())
    return case


@dataclass
class Replace:
    """An edit's result that replaces the whole manifest (other edits change it in place)."""
    value: object


def _edited(edit, m, d):
    r = edit(m, d)
    return r.value if isinstance(r, Replace) else m


def _manifest_case(edit, says, split="train"):
    def case(w: Workspace) -> Case:
        d = w.data()
        path = d / split / "manifest.json"
        m = json.loads(path.read_text())
        path.write_text(json.dumps(_edited(edit, m, d)))
        return Case(["data", "inspect", str(d / split)], [str(path), *says], keep=d)
    return case


def _manifest_train_case(edit, says):
    """The same damage met by `ndtrain train --set data.dir=...`: named as data.dir and the file, before step 1."""
    def case(w: Workspace) -> Case:
        d = w.data()
        path = d / "train" / "manifest.json"
        m = json.loads(path.read_text())
        path.write_text(json.dumps(_edited(edit, m, d)))
        out = w.tmp / "out"
        return Case(["train", "--model", "lm", "--steps", "2", "-q", "--out", str(out),
                     "--set", f"data.dir={json.dumps(str(d))}", "--set", "model.d_model=8", "--set", "model.n_heads=1",
                     "--set", "model.d_ff=8", "--set", "model.n_layers=1"], ["data.dir", str(path), *says], keep=d)
    return case


def _import_over(w: Workspace, *flags, text: Path | None = None) -> list[str]:
    """`data import` over the existing train split of the data set."""
    return ["data", "import", "--text", str(text or w.text), "--out", str(w.data() / "train"), *flags]


def _tok_case(content: bytes | str, says):
    def case(w: Workspace) -> Case:
        tok = w.file("tok.json", content)
        return Case(_import_over(w, "--tokenizer-file", str(tok)), [str(tok), *says], keep=w.data())
    return case


def _set_case(assignment: str, says, not_says=()):
    def case(w: Workspace) -> Case:
        return Case([*XOR, "--out", str(w.tmp / "o"), "--set", assignment], says, list(not_says))
    return case


# -- the table ------------------------------------------------------------------------------------------------------
CASES = {
    # --- config files and fields
    "config is a directory": lambda w: Case([*XOR, "--config", str(w.tmp), "--out", str(w.tmp / "o")],
                                            [str(w.tmp), "is a directory"]),
    "config not UTF-8": lambda w: Case([*XOR, "--config", str(w.file("c.toml", b"\xff\xfe[run]\n")),
                                        "--out", str(w.tmp / "o")], ["c.toml", "not UTF-8"]),
    "config missing": lambda w: Case([*XOR, "--config", str(w.tmp / "nope.toml"), "--out", str(w.tmp / "o")],
                                     ["nope.toml", "not found"]),
    "config not TOML": lambda w: Case([*XOR, "--config", str(w.file("c.toml", "[run\nsteps=")),
                                       "--out", str(w.tmp / "o")], ["c.toml", "not valid TOML"]),
    "config section not a table": lambda w: Case([*XOR, "--config", str(w.file("c.toml", "run = 5\n")),
                                                  "--out", str(w.tmp / "o")], ["c.toml", "run"]),
    "config lr = inf in the file": lambda w: Case([*XOR, "--config", str(w.file("c.toml", "[optim]\nlr = inf\n")),
                                                   "--out", str(w.tmp / "o")], ["optim.lr", "finite", "c.toml"]),
    "optim.lr=inf": _set_case("optim.lr=inf", ["optim.lr", "finite"]),
    "optim.lr=nan (not '>= 0')": _set_case("optim.lr=nan", ["optim.lr", "finite"], [">= 0"]),
    "optim.lr=-inf": _set_case("optim.lr=-inf", ["optim.lr", "finite"]),
    "optim.grad_clip=nan": _set_case("optim.grad_clip=nan", ["optim.grad_clip", "finite"]),
    "optim.momentum=nan": _set_case("optim.momentum=nan", ["optim.momentum", "finite"]),
    "optim.eps=nan": _set_case("optim.eps=nan", ["optim.eps", "finite"]),
    "optim.weight_decay=inf": _set_case("optim.weight_decay=inf", ["optim.weight_decay", "finite"]),
    "optim.betas=[nan, 0.9]": _set_case("optim.betas=[nan, 0.9]", ["optim.betas[0]", "finite"]),
    "cluster.heartbeat_timeout=nan": _set_case("cluster.heartbeat_timeout=nan",
                                               ["cluster.heartbeat_timeout", "finite"]),
    "cluster.stall_timeout=inf": _set_case("cluster.stall_timeout=inf", ["cluster.stall_timeout", "finite"]),
    "cluster.bucket_mb=nan": _set_case("cluster.bucket_mb=nan", ["cluster.bucket_mb", "finite"]),
    "model.dropout=nan": _set_case("model.dropout=nan", ["model.dropout", "finite"]),
    "schedule kwarg of the wrong type": lambda w: Case(
        [*XOR, "--out", str(w.tmp / "o"), "--set", 'optim.schedule="warmup_cosine"',
         "--set", 'optim.schedule_kwargs.warmup_steps="x"'],
        ["optim.schedule_kwargs.warmup_steps", "expected an integer"], ["not supported"]),
    "schedule kwarg float for an int": lambda w: Case(
        [*XOR, "--out", str(w.tmp / "o"), "--set", 'optim.schedule="warmup_cosine"',
         "--set", "optim.schedule_kwargs.warmup_steps=1.5"], ["optim.schedule_kwargs.warmup_steps", "integer"]),
    "schedule kwarg nan": lambda w: Case(
        [*XOR, "--out", str(w.tmp / "o"), "--set", 'optim.schedule="cosine"',
         "--set", "optim.schedule_kwargs.min_lr=nan"], ["optim.schedule_kwargs.min_lr", "finite"]),

    # --- the run directory
    "--out an earlier run": lambda w: Case([*XOR, "--out", str(w.run())],
                                           [str(w.run()), "not empty", "--resume", "--overwrite"], keep=w.run()),
    "--out a directory with a user's file": lambda w: Case(
        [*XOR, "--out", str(w.file("notes.txt", "mine").parent)], ["not empty", "notes.txt"], keep=w.tmp),
    "--out an existing file": lambda w: Case([*XOR, "--out", str(w.file("f", "x"))],
                                             ["run.out", "not a directory"], keep=w.tmp),
    "--out /proc/nope": lambda w: Case([*XOR, "--out", "/proc/nope"], ["run.out", "/proc/nope"]),
    "--out below a file": lambda w: Case([*XOR, "--out", str(w.file("f", "x") / "sub")],
                                         ["run.out", "cannot create"], keep=w.tmp),
    "--overwrite with --resume": lambda w: Case(
        [*XOR, "--steps", "6", "--out", str(w.run()), "--resume", str(w.run()), "--overwrite"],
        ["--overwrite", "--resume"], keep=w.run()),

    # --- checkpoint records (over the existing run: nothing of it may change)
    "ckpt: record_sha256 deleted": _ckpt_case(lambda r: r.pop("record_sha256"), ["record_sha256", "missing"]),
    "ckpt: record_sha256 deleted, step edited": _ckpt_case(
        lambda r: (r.pop("record_sha256"), r.update(step=5)), ["record_sha256"]),
    "ckpt: step edited": _ckpt_case(lambda r: r.update(step=5), ["modified"]),
    "ckpt: sha256 = 5": _ckpt_case(lambda r: r.update(sha256=5), ["'sha256'"], rehash=True),
    "ckpt: loader = 'x'": _ckpt_case(lambda r: r.update(loader="x"), ["'loader'"], rehash=True),
    "ckpt: loader batches_done = -1": _ckpt_case(lambda r: r["loader"].update(batches_done=-1), ["'loader'"],
                                                 rehash=True),
    "ckpt: npz = ../x": _ckpt_case(lambda r: r.update(npz="../x"), ["'npz'", "plain file name"], rehash=True),
    "ckpt: npz = /etc/passwd": _ckpt_case(lambda r: r.update(npz="/etc/passwd"), ["'npz'"], rehash=True),
    "ckpt: step = '35'": _ckpt_case(lambda r: r.update(step="35"), ["'step'"], rehash=True),
    "ckpt: step = -1": _ckpt_case(lambda r: r.update(step=-1), ["'step'"], rehash=True),
    "ckpt: rng = []": _ckpt_case(lambda r: r.update(rng=[]), ["'rng'"], rehash=True),
    "ckpt: data = 5": _ckpt_case(lambda r: r.update(data=5), ["'data'"], rehash=True),
    "ckpt: world_size = 0": _ckpt_case(lambda r: r.update(world_size=0), ["'world_size'"], rehash=True),
    "ckpt: format edited": _ckpt_case(lambda r: r.update(format="x"), ["not an ndtrain checkpoint"]),
    "ckpt: a JSON list": lambda w: Case(_resume(w, w.file("ckpt-00000009.json", "[1, 2]")),
                                        ["ckpt-00000009.json", "not an ndtrain checkpoint"], keep=w.run()),
    "ckpt: binary": lambda w: Case(_resume(w, w.file("ckpt-00000009.json", b"\xff\x00\xfe" * 10)),
                                   ["ckpt-00000009.json", "not valid JSON"], keep=w.run()),

    # --- data import over an existing data set (it must stay byte-identical)
    "import --shard-rows 0": lambda w: Case(_import_over(w, "--shard-rows", "0"), ["--shard-rows", ">= 1"],
                                            keep=w.data()),
    "import --block-size -5": lambda w: Case(_import_over(w, "--block-size", "-5"), ["--block-size", ">= 1"],
                                             keep=w.data()),
    "import --block-size 0": lambda w: Case(_import_over(w, "--block-size", "0"), ["--block-size"], keep=w.data()),
    "import --text a directory": lambda w: Case(_import_over(w, text=w.tmp), [str(w.tmp), "is a directory"],
                                                keep=w.data()),
    "import --text missing": lambda w: Case(_import_over(w, text=w.tmp / "nope.txt"), ["nope.txt", "no such file"],
                                            keep=w.data()),
    "import --text not UTF-8": lambda w: Case(_import_over(w, text=w.file("b.txt", b"ok\n\xff\xfe\n")),
                                              ["b.txt", "line 2", "not UTF-8"], keep=w.data()),
    "import --text empty": lambda w: Case(_import_over(w, text=w.file("e.txt", "")), ["e.txt", "empty"],
                                          keep=w.data()),
    "import bpe --vocab-size 10": lambda w: Case(_import_over(w, "--tokenizer", "bpe", "--vocab-size", "10"),
                                                 ["--vocab-size", "260"], keep=w.data()),
    "import char --vocab-size 3": lambda w: Case(_import_over(w, "--vocab-size", "3"), ["--vocab-size", "5"],
                                                 keep=w.data()),
    "import --vocab-size with --tokenizer-file": lambda w: Case(
        _import_over(w, "--vocab-size", "50", "--tokenizer-file", str(w.data() / "val" / "tokenizer.json")),
        ["--vocab-size", "--tokenizer-file"], keep=w.data()),
    "import --tokenizer-file missing": lambda w: Case(_import_over(w, "--tokenizer-file", str(w.tmp / "no.json")),
                                                      ["no.json", "no such tokenizer file"], keep=w.data()),
    "import --tokenizer-file a directory": lambda w: Case(_import_over(w, "--tokenizer-file", str(w.tmp)),
                                                          [str(w.tmp), "is a directory"], keep=w.data()),
    "tokenizer: not JSON": _tok_case("{nope", ["not a tokenizer JSON file"]),
    "tokenizer: char without tokens": _tok_case('{"ndtrain_tokenizer": "char"}', ["'tokens'", "missing"]),
    "tokenizer: tokens = 5": _tok_case('{"ndtrain_tokenizer": "char", "tokens": 5}', ["'tokens'", "list of strings"]),
    "tokenizer: tokens hold a number": _tok_case('{"ndtrain_tokenizer": "word", "tokens": ["a", 1]}', ["'tokens'"]),
    "tokenizer: duplicate tokens": _tok_case('{"ndtrain_tokenizer": "word", "tokens": ["a", "a"]}', ["twice"]),
    "tokenizer: unknown kind": _tok_case('{"ndtrain_tokenizer": "sentencepiece", "tokens": []}',
                                         ["'ndtrain_tokenizer'"]),
    "tokenizer: {model: {}}": _tok_case('{"model": {}}', ["not a valid HF tokenizers file"]),
    "tokenizer: binary": _tok_case(bytes(range(256)), ["not UTF-8"]),
    "tokenizer: a JSON list": _tok_case("[1, 2]", ["JSON object expected"]),
    "import --out holds a user's file": lambda w: Case(
        ["data", "import", "--text", str(w.text), "--out", str(w.file("notes.txt", "mine").parent)],
        ["notes.txt", "not part of an ndtrain data set"], keep=w.tmp),
    "import --out an existing file": lambda w: Case(
        ["data", "import", "--text", str(w.text), "--out", str(w.file("f", "x"))], ["not a directory"], keep=w.tmp),
    "import --src without --tgt": lambda w: Case(
        ["data", "import", "--src", str(w.text), "--out", str(w.data() / "train")], ["--src", "--tgt"],
        keep=w.data()),
    "import tsv with a bad line": lambda w: Case(
        ["data", "import", "--tsv", str(w.file("p.tsv", "a\tb\nc\n")), "--out", str(w.data() / "train")],
        ["p.tsv", "line 2"], keep=w.data()),
    "import --val-fraction 1.5": lambda w: Case(
        ["data", "import", "--text", str(w.text), "--out", str(w.data()), "--val-fraction", "1.5"],
        ["--val-fraction"], keep=w.data()),
    "import --val-fraction, val holds a user's file": lambda w: (
        (w.data() / "val" / "notes.txt").write_text("mine"),
        Case(["data", "import", "--text", str(w.text), "--out", str(w.data()), "--val-fraction", "0.2"],
             [str(w.data() / "val"), "notes.txt"], keep=w.data()))[1],
    "import --val-fraction with a bad --tokenizer-file": lambda w: Case(
        ["data", "import", "--text", str(w.text), "--out", str(w.data()), "--val-fraction", "0.2",
         "--tokenizer-file", str(w.file("tok.json", '{"model": {}}'))], ["tok.json"], keep=w.data()),
    "prepare --shard-rows 0": lambda w: Case(
        ["data", "prepare", "--task", "xor", "--out", str(w.tmp / "p"), "--shard-rows", "0"], ["--shard-rows"]),

    # --- manifests (untrusted: structure, types, contained paths)
    "manifest without shards": _manifest_case(lambda m, d: m.pop("shards"), ["'shards'", "missing"]),
    "manifest with no shards": _manifest_case(lambda m, d: m.update(shards=[]), ["no shards"]),
    "manifest unknown info key": _manifest_case(lambda m, d: m["info"].update(colour="red"), ["info.colour",
                                                                                             "unknown key"]),
    "manifest is a JSON list": _manifest_case(lambda m, d: Replace([m]), ["JSON object expected"]),
    "manifest shard ../../etc/passwd": _manifest_case(
        lambda m, d: m["shards"][0].update(file="../../../../../etc/passwd"), ["shards[0].file", "plain file name"]),
    "manifest shard absolute path": _manifest_case(
        lambda m, d: m["shards"][0].update(file=str(d / "val" / "shard-00000.arrow")), ["shards[0].file"]),
    "manifest tokenizer ../": _manifest_case(
        lambda m, d: m["tokenizer"].update(file="../val/tokenizer.json"), ["tokenizer.file", "plain file name"]),
    "manifest shard rows a string": _manifest_case(lambda m, d: m["shards"][0].update(rows="60"),
                                                   ["shards[0].rows"]),
    "manifest shard sha256 = 5": _manifest_case(lambda m, d: m["shards"][0].update(sha256=5), ["shards[0].sha256"]),
    "manifest kind unknown": _manifest_case(lambda m, d: m.update(kind="image"), ["'kind'"]),
    "manifest vocab_size -1": _manifest_case(lambda m, d: m.update(vocab_size=-1), ["'vocab_size'"]),
    "manifest info.kind differs": _manifest_case(lambda m, d: m["info"].update(kind="seq2seq"), ["info.kind"]),
    "manifest info.max_tgt_len a string": _manifest_case(lambda m, d: m["info"].update(max_tgt_len="16"),
                                                         ["info.max_tgt_len"]),
    "train: manifest shard outside": _manifest_train_case(
        lambda m, d: m["shards"][0].update(file="/etc/passwd"), ["shards[0].file"]),
    "train: manifest without shards": _manifest_train_case(lambda m, d: m.pop("shards"), ["'shards'"]),
    "train: tokenizer.json replaced (binary)": lambda w: (
        (w.data() / "train" / "tokenizer.json").write_bytes(b"\x00\xff" * 8),
        Case(["data", "inspect", str(w.data() / "train")], ["tokenizer.json", "sha256"], keep=w.data()))[1],

    # --- a run directory read back by `ndtrain eval`
    "eval: task_info.json a JSON list": lambda w: (
        (w.run() / "task_info.json").write_text("[1]"),
        Case(["eval", "--run", str(w.run())], ["task_info.json", "not a valid task info record"], keep=w.run()))[1],
    "eval: task_info.json binary": lambda w: (
        (w.run() / "task_info.json").write_bytes(b"\xff\xfe\x00"),
        Case(["eval", "--run", str(w.run())], ["task_info.json"], keep=w.run()))[1],
    "eval: tokenizer.json malformed": lambda w: (
        (w.run() / "tokenizer.json").write_text('{"ndtrain_tokenizer": "char", "tokens": 5}'),
        Case(["eval", "--run", str(w.run())], ["tokenizer.json", "'tokens'"], keep=w.run()))[1],

    # --- the data and the model disagree / the run goes bad
    "block size: data longer than the model's": lambda w: Case(
        ["train", "--model", "lm", "--steps", "2", "-q", "--out", str(w.tmp / "o"),
         "--set", f"data.dir={json.dumps(str(w.data()))}", "--set", "model.block_size=8", "--set", "model.d_model=8",
         "--set", "model.n_heads=1", "--set", "model.d_ff=8", "--set", "model.n_layers=1"],
        ["model.block_size", "16"], keep=w.data()),
    "data.dir missing": lambda w: Case(
        [*XOR, "--out", str(w.tmp / "o"), "--set", f"data.dir={json.dumps(str(w.tmp / 'nodata'))}"],
        ["data.dir", "nodata"]),
    "non-finite steps stop the run": lambda w: Case(
        ["train", "--task", "sine", "--model", "mlp", "--steps", "12", "-q", "--out", str(w.tmp / "o"),
         "--set", "optim.lr=1e25", "--set", 'optim.name="sgd"', "--set", "run.max_nonfinite=2"],
        ["non-finite steps in a row", "run.max_nonfinite", "optim.lr"], mid_run=True),
    "parameters end non-finite": lambda w: Case(
        [*XOR, "--out", str(w.tmp / "o"), "--set", "optim.lr=1e300"],
        ["parameters are not finite", "optim.lr"], mid_run=True),
}


@pytest.fixture
def workspace(tmp_path, originals):
    return Workspace(tmp_path, originals)


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def check_one_line(c: Case, rc: int, err: str) -> str:
    assert "Traceback" not in err, err
    assert rc == c.rc, (rc, err)
    lines = err.rstrip("\n").splitlines()
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # exactly one error line, and it is the last
    if not c.mid_run:
        assert len(lines) == 1, err  # nothing else on stderr either
    line = errors[0]
    for s in c.says:
        assert s in line, (s, line)
    for s in c.not_says:
        assert s not in line, (s, line)
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, workspace, capsys):
    c = CASES[name](workspace)
    before = tree_digest(c.keep) if c.keep is not None else None
    rc, err = run_cli(c.argv, capsys)
    check_one_line(c, rc, err)
    if c.keep is not None:
        assert tree_digest(c.keep) == before, "an earlier file was changed"
    assert not [p for p in workspace.tmp.rglob(".*tmp*")], "temporary files left behind"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


# -- a full disk ------------------------------------------------------------------------------------------------------
def _enospc_on_fsync(monkeypatch, when):
    """os.fsync raises ENOSPC for files whose name matches `when` (the first byte that does not fit)."""
    real = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if when(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_during_import_over_a_data_set(workspace, capsys, monkeypatch):
    keep = workspace.data()
    before = tree_digest(keep)
    _enospc_on_fsync(monkeypatch, lambda name: "shard-" in name)
    c = Case(_import_over(workspace), [str(keep / "train" / "shard-00000.arrow"), "no space left", "needs", "free"])
    rc, err = run_cli(c.argv, capsys)
    check_one_line(c, rc, err)
    assert tree_digest(keep) == before
    assert not [p for p in workspace.tmp.rglob(".*")], "temporary files left behind"


def test_disk_full_while_writing_a_checkpoint(workspace, capsys, monkeypatch):
    out = workspace.tmp / "o"
    _enospc_on_fsync(monkeypatch, lambda name: name.endswith(".npz.tmp") or ".npz.tmp" in name)
    c = Case([*XOR, "--out", str(out)], [str(out / "checkpoints"), ".npz", "no space left", "needs", "free"],
             mid_run=True)
    rc, err = run_cli(c.argv, capsys)
    check_one_line(c, rc, err)
    assert not list((out / "checkpoints").glob("*")), "no checkpoint (nor a temp file) may be left half-written"


# -- the run directory: refused, --overwrite, fresh names ---------------------------------------------------------
def test_overwrite_clears_what_the_earlier_run_wrote(workspace, capsys):
    run = workspace.run()
    old = json.loads((run / "summary.json").read_text())
    (run / "checkpoints" / "ckpt-00000099.json").write_text("{}")  # a stale checkpoint must not survive
    (run / "tb").mkdir()
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    assert main([*XOR, "--steps", "2", "--out", str(run), "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2 != old["steps"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.json", "ckpt-00000002.npz"]
    assert not (run / "tb").exists() and (run / "notes.txt").read_text() == "mine"
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_without_out_every_run_gets_a_fresh_directory(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace.tmp)
    for _ in range(2):
        assert main(XOR) == 0
    runs = sorted(p.name for p in (workspace.tmp / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("xor-mlp-") for r in runs)


def test_fresh_run_dir_adds_a_suffix_when_the_name_is_taken(tmp_path):
    from ndtrain.launch.rundir import fresh_run_dir
    a = fresh_run_dir("t", "m", tmp_path, now=0)
    a.mkdir()
    b = fresh_run_dir("t", "m", tmp_path, now=0)
    assert a.name == "t-m-19700101-000000" and b.name == "t-m-19700101-000000-2"


def test_resume_into_its_own_directory_is_allowed(workspace, capsys):
    run = workspace.run()
    assert main([*XOR, "--steps", "5", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write: chmod for a normal user; a read-only tmpfs mount for root (skip without)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_out_is_refused(read_only_dir, capsys):
    c = Case([*XOR, "--out", str(read_only_dir / "run")], ["run.out", str(read_only_dir / "run")])
    rc, err = run_cli(c.argv, capsys)
    check_one_line(c, rc, err)


# -- the console script itself (a subprocess: what a user runs) -------------------------------------------------------
def _script(argv, **kw):
    exe = Path(sys.executable).with_name("ndtrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ndtrain.launch.cli"]
    env = {**os.environ, "NDTRAIN_REPORT": "0", "NDTRAIN_TENSORBOARD": "0", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, env=env, **kw)


@pytest.mark.parametrize("name", ["config is a directory", "--out an earlier run", "import --shard-rows 0",
                                  "tokenizer: binary", "manifest shard ../../etc/passwd", "optim.lr=nan (not '>= 0')"])
def test_console_script_bad_input(name, workspace):
    c = CASES[name](workspace)
    before = tree_digest(c.keep) if c.keep is not None else None
    r = _script(c.argv)
    check_one_line(c, r.returncode, r.stderr)
    if c.keep is not None:
        assert tree_digest(c.keep) == before


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KB tmpfs (root only): a disk that really fills."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_console_script_real_full_disk_during_import(tiny_tmpfs, tmp_path):
    text = tmp_path / "big.txt"
    text.write_text("".join(f"{i} lorem ipsum dolor sit amet consectetur\n" for i in range(20000)))  # ~1 MB
    out = tiny_tmpfs / "data"
    r = _script(["data", "import", "--text", str(text), "--out", str(out)])
    c = Case([], [str(out), "no space left", "free"])
    check_one_line(c, r.returncode, r.stderr)
    assert list(tiny_tmpfs.iterdir()) == []  # the temporary directory is gone, nothing half-written remains


def test_disk_full_on_the_val_split_keeps_both_old_splits(workspace, capsys, monkeypatch):
    """--val-fraction writes train/ and val/ together: the disk filling on val/ must not leave a new train/ beside
    the old val/ (two tokenizers' ids mixed)."""
    keep = workspace.data()
    before = tree_digest(keep)
    _enospc_on_fsync(monkeypatch, lambda name: "/.val.tmp-" in name and "shard-" in name)
    c = Case(["data", "import", "--text", str(workspace.text), "--out", str(keep), "--val-fraction", "0.2",
              "--tokenizer", "word"], [str(keep / "val"), "no space left"])
    rc, err = run_cli(c.argv, capsys)
    check_one_line(c, rc, err)
    assert tree_digest(keep) == before
