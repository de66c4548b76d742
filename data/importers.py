"""User text -> shard directories: a plain text file for LM, a parallel corpus (two line-aligned files or a TSV) for
seq2seq. Files may be gzip-compressed (by magic bytes, whatever the name). Errors name the file and line.

LM rows are the file's lines, each keeping its newline, so the packed token stream is the whole text (for char and
byte-level BPE tokenizers exactly; the word tokenizer drops whitespace). One shared tokenizer serves src and tgt.
Pass `tokenizer_file` to reuse the tokenizer of an earlier import (a validation set must use the training ids).
Every argument and the tokenizer file are checked before anything is read or written, and the shards are written
beside the output directory and swapped in complete (data.shards.write_dataset): a failed import leaves an earlier
data set at `out_dir` byte for byte as it was.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .info import TaskInfo
from .shards import DataError, StagedWrite, check_output_dir, write_dataset
from .tokenizer import KINDS, Tokenizer, check_vocab_size, load_tokenizer, train_tokenizer


def read_lines(path: str | Path, *, keepends: bool = False) -> list[str]:
    """UTF-8 lines of a (possibly gzipped) file. DataError for a missing, empty or undecodable file."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a text file")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: broken gzip data ({e})") from None
    if not raw.strip():
        raise DataError(f"{p}: empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}: line {line}: bytes that are not UTF-8 ({raw[e.start:e.end]!r} at byte "
                        f"{e.start})") from None
    text = text.lstrip("\ufeff")
    return text.splitlines(keepends=keepends)


def check_import_args(out_dir, *, tokenizer: str, vocab_size: int | None, shard_rows: int,
                      block_size: int | None = None, tokenizer_file=None) -> Tokenizer | None:
    """Every argument of an import, before any input is read or anything written; returns the tokenizer loaded
    from tokenizer_file (None: one is trained on the input). DataError naming the argument or file."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise DataError(f"shard_rows: must be an integer >= 1, got {shard_rows!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or
                                   block_size < 1):
        raise DataError(f"block_size: must be an integer >= 1, got {block_size!r}")
    if tokenizer not in KINDS:
        raise DataError(f"tokenizer: unknown tokenizer {tokenizer!r}; choose one of {sorted(KINDS)}")
    try:
        check_vocab_size(tokenizer, vocab_size)
    except ValueError as e:
        raise DataError(str(e)) from None
    check_output_dir(out_dir)
    if tokenizer_file is None:
        return None
    try:
        return load_tokenizer(tokenizer_file)
    except ValueError as e:
        raise DataError(str(e)) from None


def _tokenizer(kind: str, texts: list[str], vocab_size: int | None, loaded: Tokenizer | None) -> Tokenizer:
    if loaded is not None:
        return loaded
    try:
        return train_tokenizer(kind, texts, vocab_size)
    except ValueError as e:
        raise DataError(str(e)) from None


def _encode_all(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]


def import_text(path, out_dir, tokenizer: str = "char", vocab_size: int | None = None, *, block_size: int = 64,
                shard_rows: int = 65536, tokenizer_file=None, name: str | None = None, lines: list[str] | None = None,
                tok: Tokenizer | None = None, writer: StagedWrite | None = None) -> Path:
    """LM shards of a text file (`lines`/`tok`: already read lines and a trained tokenizer, for split_text;
    `writer`: a StagedWrite that swaps this data set in together with others)."""
    loaded = check_import_args(out_dir, tokenizer=tokenizer, vocab_size=vocab_size, shard_rows=shard_rows,
                               block_size=block_size, tokenizer_file=tokenizer_file)
    lines = read_lines(path, keepends=True) if lines is None else lines
    tok = tok or _tokenizer(tokenizer, lines, vocab_size, loaded)
    docs = _encode_all(tok, lines)
    n_tokens = sum(len(d) for d in docs)
    if n_tokens < 2:
        raise DataError(f"{path}: fewer than 2 tokens after tokenization")
    info = TaskInfo(name or Path(path).name.split(".")[0], "lm", tgt_vocab_size=tok.vocab_size,
                    max_tgt_len=block_size, extra={"tokenizer": tok.kind})
    source = {"import": "text", "file": str(path), "tokenizer": tok.kind, "vocab_size": vocab_size}
    write = writer.write if writer is not None else write_dataset
    return write(out_dir, info, {"tokens": docs}, shard_rows=shard_rows, tokenizer=tok, source=source)


def import_text_split(path, out_dir, val_fraction: float, tokenizer: str = "char", vocab_size: int | None = None,
                      **kw) -> tuple[Path, Path]:
    """One text file -> out_dir/train and out_dir/val with ONE tokenizer trained on the whole text (nanoGPT's
    prepare.py: the first 1 - val_fraction of the characters train, the rest validates). The cut falls on the line
    boundary nearest that point, so both splits keep whole lines."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    loaded = check_import_args(out / "train", tokenizer=tokenizer, vocab_size=vocab_size,
                               shard_rows=kw.get("shard_rows", 65536), block_size=kw.get("block_size", 64),
                               tokenizer_file=kw.pop("tokenizer_file", None))
    check_output_dir(out / "val")
    lines = read_lines(path, keepends=True)
    if len(lines) < 2:
        raise DataError(f"{path}: one line only; a validation split needs at least two")
    lengths = np.cumsum([len(x) for x in lines])
    cut = int(np.searchsorted(lengths, (1.0 - val_fraction) * lengths[-1])) + 1
    cut = min(max(cut, 1), len(lines) - 1)  # both splits non-empty
    tok = _tokenizer(tokenizer, lines, vocab_size, loaded)
    with StagedWrite() as w:  # both splits or neither: an earlier import at out_dir stays whole if this one fails
        train = import_text(path, out / "train", tokenizer, vocab_size, lines=lines[:cut], tok=tok, writer=w, **kw)
        val = import_text(path, out / "val", tokenizer, vocab_size, lines=lines[cut:], tok=tok, writer=w, **kw)
    return train, val


def read_parallel(src_path=None, tgt_path=None, tsv_path=None) -> tuple[list[str], list[str]]:
    if tsv_path is not None:
        src, tgt = [], []
        for i, line in enumerate(read_lines(tsv_path), start=1):
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{tsv_path}: line {i}: expected 2 tab-separated fields, found {len(parts)}")
            src.append(parts[0])
            tgt.append(parts[1])
        return src, tgt
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}")
    return src, tgt


def import_parallel(out_dir, *, src=None, tgt=None, tsv=None, tokenizer: str = "char", vocab_size: int | None = None,
                    shard_rows: int = 65536, tokenizer_file=None, name: str | None = None) -> Path:
    loaded = check_import_args(out_dir, tokenizer=tokenizer, vocab_size=vocab_size, shard_rows=shard_rows,
                               tokenizer_file=tokenizer_file)
    src_lines, tgt_lines = read_parallel(src, tgt, tsv)
    tok = _tokenizer(tokenizer, src_lines + tgt_lines, vocab_size, loaded)
    src_ids, tgt_ids = _encode_all(tok, src_lines), _encode_all(tok, tgt_lines)
    label = name or Path(tsv or src).name.split(".")[0]
    info = TaskInfo(label, "seq2seq", src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                    max_src_len=max(len(s) for s in src_ids), max_tgt_len=max(len(t) for t in tgt_ids) + 1,
                    extra={"tokenizer": tok.kind})
    source = {"import": "parallel", "files": [str(p) for p in (src, tgt, tsv) if p], "tokenizer": tok.kind,
              "vocab_size": vocab_size}
    return write_dataset(out_dir, info, {"src": src_ids, "tgt": tgt_ids}, shard_rows=shard_rows, tokenizer=tok,
                         source=source)
