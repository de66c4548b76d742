"""Dataset: a TaskInfo plus columns (in memory or memory-mapped shards), and how rows become model batches.

Row counts (what the loader permutes):
  vector / seq2seq  one row per example;
  lm                one row per block of the packed token stream: block i = stream[i*T : i*T + T + 1], so
                    x = block[:-1], y = block[1:] (T = block_size; blocks do not overlap, the last partial block
                    is dropped: n_blocks = (n_tokens - 1) // T).
Batch formats are those of cluster/job.py (TaskModel).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .columns import DenseColumn, RaggedColumn, TokenStream, add_bos_eos
from .info import PAD, TaskInfo

VECTOR_KINDS = ("classification", "regression")


@dataclass
class Dataset:
    info: TaskInfo
    columns: dict  # name -> DenseColumn | RaggedColumn
    tokenizer: object = None  # a data.tokenizer.Tokenizer, if the data is text
    source: str = "<memory>"  # directory of the shards, for messages
    _stream: TokenStream | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.info.kind

    def __len__(self) -> int:
        """Examples (lm: documents) stored; see n_rows for what a loader iterates."""
        return len(next(iter(self.columns.values())))

    def stream(self) -> TokenStream:
        if self._stream is None:
            self._stream = TokenStream(self.columns["tokens"])
        return self._stream

    def n_rows(self, block_size: int | None = None) -> int:
        if self.kind == "lm":
            return max(0, (len(self.stream()) - 1) // _block(self, block_size))
        return len(self)

    def lengths(self) -> np.ndarray | None:
        """(N,) per-row length used for bucketing (seq2seq: max(src, tgt + 1)); None for fixed-size rows."""
        if self.kind != "seq2seq":
            return None
        return np.maximum(self.columns["src"].lengths(), self.columns["tgt"].lengths() + 1)

    def batch(self, idx: np.ndarray, *, block_size: int | None = None, max_src_len: int | None = None,
              max_tgt_len: int | None = None, masks: bool = False) -> dict[str, np.ndarray]:
        """The model batch of rows idx (B,). seq2seq: sources cut to max_src_len tokens, targets to
        max_tgt_len - 1 (so tgt_in = BOS + tgt fits in max_tgt_len); masks=True adds src_pad_mask /
        tgt_pad_mask: (B, S) / (B, T) bool, True at PAD."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.kind in VECTOR_KINDS:
            return {"x": self.columns["x"].take(idx), "y": self.columns["y"].take(idx)}
        if self.kind == "seq2seq":
            src_col, tgt_col = self.columns["src"], self.columns["tgt"]
            cut = None if max_tgt_len is None else max(max_tgt_len - 1, 0)
            tgt, tgt_lens = tgt_col.gather(idx, cut)  # gathered once for both shifted copies
            b = {"src": src_col.padded(idx, max_len=max_src_len),
                 "tgt_in": add_bos_eos(tgt, tgt_lens, bos=True, eos=False),
                 "tgt_out": add_bos_eos(tgt, tgt_lens, bos=False, eos=True)}
            if masks:
                b["src_pad_mask"] = b["src"] == PAD
                b["tgt_pad_mask"] = b["tgt_out"] == PAD
            return b
        if self.kind == "lm":
            T = _block(self, block_size)
            w = self.stream().windows(idx * T, T + 1)  # (B, T + 1)
            return {"x": w[:, :-1], "y": w[:, 1:]}
        raise ValueError(f"{self.source}: unsupported task kind {self.kind!r}")


def _block(ds: Dataset, block_size: int | None) -> int:
    T = block_size or ds.info.max_tgt_len
    if not T or T < 1:
        raise ValueError(f"{ds.source}: a language-model loader needs block_size (info.max_tgt_len is not set)")
    return int(T)


def from_columns(info: TaskInfo, columns: dict, tokenizer=None) -> Dataset:
    """In-memory Dataset from `tasks.generate`-style columns: arrays for x/y, lists of int arrays for src/tgt/
    tokens (or a single 1-D int array for an LM token stream)."""
    cols = {}
    for name, value in columns.items():
        if name in ("src", "tgt", "tokens"):
            if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
                value = [value]  # one document
            cols[name] = RaggedColumn.from_rows(list(value))
        else:
            cols[name] = DenseColumn([np.asarray(value)])
    want = {"seq2seq": {"src", "tgt"}, "lm": {"tokens"}}.get(info.kind, {"x", "y"})
    if set(cols) != want:
        raise ValueError(f"task {info.name!r} ({info.kind}): columns must be {sorted(want)}, got {sorted(cols)}")
    if len({len(c) for c in cols.values()}) != 1:
        raise ValueError(f"task {info.name!r}: columns have different row counts "
                         f"{ {k: len(c) for k, c in cols.items()} }")
    return Dataset(info, cols, tokenizer)


def as_dataset(obj) -> Dataset:
    """Accept a Dataset, or the (TaskInfo, columns) pair that tasks.generate returns."""
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], TaskInfo):
        return from_columns(*obj)
    raise TypeError(f"expected a Dataset or a (TaskInfo, columns) pair, got {type(obj).__name__}")
