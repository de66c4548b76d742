"""Built-in tasks as data: `generate(name, n_rows, seed, split) -> (TaskInfo, columns)`.

Vector tasks give columns {"x": (N, D) float32, "y": (N,) int64 class labels | (N, K) float32 targets}.
Sequence tasks give {"src": list of (L,) int32, "tgt": list of (L,) int32}: token ids WITHOUT BOS/EOS (the loader
adds them), from a char tokenizer over the task's fixed alphabet (`task_tokenizer(name)`; its JSON is also in
`info.extra["tokenizer_json"]`). `info.max_src_len` / `max_tgt_len` are the longest src / tgt_in rows a batch can
have (tgt_in = BOS + tgt, so max_tgt_len = longest target + 1).
"""
from __future__ import annotations

import zlib

import numpy as np

from .info import TaskInfo
from .seq_tasks import SEQ_TASKS, generate_pairs
from .tokenizer import CharTokenizer, Tokenizer

VECTOR_TASKS = ("xor", "spirals", "sine", "digits")
TASKS = VECTOR_TASKS + tuple(SEQ_TASKS)
DEFAULT_ROWS = {"xor": 256, "spirals": 1000, "sine": 1000, "digits": None, "copy": 10_000, "reverse": 10_000,
                "sort": 10_000, "add": 20_000, "dates": 20_000}
SPLITS = ("train", "val")


def _rng(name, seed, split):
    return np.random.default_rng([seed, zlib.crc32(name.encode()), SPLITS.index(split)])


def _xor(n, rng):
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    if n <= 4:  # the four points themselves
        pick = np.arange(n)
        x = corners[pick]
    else:  # noisy samples around them
        pick = rng.integers(0, 4, n)
        x = corners[pick] + rng.normal(0, 0.1, (n, 2)).astype(np.float32)
    y = (corners[pick, 0] != corners[pick, 1]).astype(np.int64)
    return TaskInfo("xor", "classification", n_features=2, n_outputs=2), x.astype(np.float32), y


def _spirals(n, rng):
    # Two interleaved arms: radius grows with the angle; class 1 is class 0 turned by pi.
    y = rng.integers(0, 2, n)
    t = rng.uniform(0, 1, n)
    angle = t * 3 * np.pi + y * np.pi
    r = 0.1 + t
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1) + rng.normal(0, 0.02, (n, 2))
    return TaskInfo("spirals", "classification", n_features=2, n_outputs=2), x.astype(np.float32), y.astype(np.int64)


def _sine(n, rng):
    x = rng.uniform(-np.pi, np.pi, (n, 1))
    return TaskInfo("sine", "regression", n_features=1, n_outputs=1), x.astype(np.float32), np.sin(x).astype(np.float32)


def _digits(n, seed, split):
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    order = np.random.default_rng([seed, 80_20]).permutation(len(d.target))
    n_train = int(round(0.8 * len(order)))
    rows = order[:n_train] if split == "train" else order[n_train:]
    if n is not None:
        rows = rows[:n]
    x = (d.data[rows] / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    return TaskInfo("digits", "classification", n_features=64, n_outputs=10), x, d.target[rows].astype(np.int64)


def task_tokenizer(name: str) -> Tokenizer:
    """The char tokenizer of a built-in sequence task (a fixed alphabet: same ids on every machine)."""
    return CharTokenizer.from_alphabet(SEQ_TASKS[name][1])


def task_kind(name: str) -> str:
    if name in ("sine",):
        return "regression"
    if name in VECTOR_TASKS:
        return "classification"
    if name in SEQ_TASKS:
        return "seq2seq"
    raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")


def generate(name: str, n_rows: int | None = None, seed: int = 0, split: str = "train") -> tuple[TaskInfo, dict]:
    """Rows of a built-in task, deterministic in (name, n_rows, seed, split). n_rows=None: the task's default
    (digits: the whole 80 % / 20 % split)."""
    task_kind(name)  # validates the name
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_rows is None:
        n_rows = DEFAULT_ROWS[name]
    if n_rows is not None and n_rows < 1:
        raise ValueError(f"task {name!r}: n_rows must be >= 1, got {n_rows}")
    if name in VECTOR_TASKS:
        if name == "digits":
            info, x, y = _digits(n_rows, seed, split)
        else:
            info, x, y = {"xor": _xor, "spirals": _spirals, "sine": _sine}[name](n_rows, _rng(name, seed, split))
        return info, {"x": x, "y": y}
    tok = task_tokenizer(name)
    pairs = generate_pairs(name, n_rows, seed, split)
    src = [tok.encode(s) for s, _ in pairs]
    tgt = [tok.encode(t) for _, t in pairs]
    _, _, max_src, max_tgt = SEQ_TASKS[name]
    info = TaskInfo(name, "seq2seq", src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                    max_src_len=max_src, max_tgt_len=max_tgt + 1,
                    extra={"tokenizer": "char", "tokenizer_json": tok.to_json()})
    return info, {"src": src, "tgt": tgt}
