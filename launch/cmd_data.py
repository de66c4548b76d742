"""`ndtrain data prepare | import | inspect`: build and look at shard directories."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ndtrain.launch.errors import UsageError
from ndtrain.data.atomic import DiskFullError
from ndtrain.data.shards import DataError
from ndtrain.data.prepare import prepare
from ndtrain.data.tasks import TASKS
from ndtrain.data.importers import import_parallel, import_text, import_text_split
from ndtrain.data.tokenizer import check_vocab_size
from ndtrain.data.reader import open_dataset
from ndtrain.data.reader import read_manifest


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare, import and inspect Arrow shard directories",
                              description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    pr = sub.add_parser("prepare", help="write a built-in task as shards (OUT/train and OUT/val)",
                        description="Write a built-in task as shards: OUT/train and OUT/val, each a shard directory "
                                    "with its manifest.json (train with `ndtrain train --task TASK --data OUT`).",
                        formatter_class=fmt)
    pr.add_argument("--task", required=True, help="built-in task (xor, spirals, sine, digits, copy, reverse, sort, "
                                                  "add, dates)")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory (DIR/train, DIR/val)")
    pr.add_argument("--rows", type=int, default=None, help="training rows (default: the task's own number)")
    pr.add_argument("--val-rows", type=int, default=-1, help="validation rows (default: rows / 10)")
    pr.add_argument("--shard-rows", type=int, default=65536, help="rows per shard file (default: %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    pr.set_defaults(func=run_prepare)

    im = sub.add_parser("import", help="tokenize a text file (LM) or a parallel corpus (seq2seq) into shards",
                        description=IMPORT_DOC, formatter_class=fmt)
    src = im.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="plain text file (gz ok) -> language-model shards")
    src.add_argument("--src", metavar="FILE", help="source side of a line-aligned parallel corpus (with --tgt)")
    src.add_argument("--tsv", metavar="FILE", help="parallel corpus as one TSV file: source<TAB>target")
    im.add_argument("--tgt", metavar="FILE", help="target side of the parallel corpus (with --src)")
    im.add_argument("--tokenizer", choices=["char", "word", "bpe"], default="char",
                    help="tokenizer trained on the input (default: %(default)s)")
    im.add_argument("--vocab-size", type=int, default=None, metavar="N",
                    help="vocabulary size including the 4 special ids (default: 1000 for bpe; char and word keep "
                         "every symbol, or the N - 4 most frequent)")
    im.add_argument("--tokenizer-file", metavar="JSON",
                    help="reuse this tokenizer.json (e.g. the training import's) instead of training one")
    im.add_argument("--block-size", type=int, default=64, metavar="T",
                    help="LM context length recorded in the manifest (default: %(default)s, the shakespeare "
                         "preset's model.block_size; a model's block_size must be >= it)")
    im.add_argument("--val-fraction", type=float, default=None, metavar="F",
                    help="with --text: write OUT/train and OUT/val, the last F of the text validating, one tokenizer "
                         "for both (default: one directory, OUT)")
    im.add_argument("--shard-rows", type=int, default=65536, metavar="N",
                    help="rows per shard file (default: %(default)s)")
    im.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    im.set_defaults(func=run_import)

    ins = sub.add_parser("inspect", help="print a shard directory's manifest summary and a few decoded rows",
                         description="Print a shard directory's manifest summary (rows, tokens, tokenizer, columns) "
                                     "and its first rows decoded; a `data prepare` directory shows train and val.")
    ins.add_argument("dir", help="a shard directory (with manifest.json), or one holding train/ and val/")
    ins.add_argument("--rows", type=int, default=3, help="rows to decode (default: %(default)s)")
    ins.add_argument("--no-verify", action="store_true", help="skip the sha256 pass over the shard files")
    ins.set_defaults(func=run_inspect)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


IMPORT_DOC = """Tokenize your own text into Arrow shards.

    ndtrain data import --text input.txt --val-fraction 0.1 --out data/shk     # data/shk/train + data/shk/val
    ndtrain train --task shakespeare --data data/shk
    ndtrain data import --src train.en --tgt train.de --tokenizer bpe --vocab-size 8000 --out data/m30k/train
    ndtrain data import --src val.en --tgt val.de --tokenizer-file data/m30k/train/tokenizer.json --out data/m30k/val

A validation split must use the training split's ids: --val-fraction does that for one text file; otherwise
import it with --tokenizer-file pointing at the training import's tokenizer.json.
"""


def _data_errors(fn):
    """DataError (bad input, naming the file) and a full disk (naming the path and the space needed): one line."""
    def run(args):

        try:
            return fn(args)
        except (DataError, DiskFullError) as e:
            raise UsageError(str(e)) from None
    run.__name__ = fn.__name__
    return run


@_data_errors
def run_prepare(args) -> int:

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; built-in tasks: {', '.join(TASKS)}")
    for name in ("rows", "shard_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    out = prepare(args.task, args.out, rows=args.rows, shard_rows=args.shard_rows, seed=args.seed,
                  val_rows=args.val_rows)
    print(_summary(out / "train"))
    print(_summary(out / "val"))
    return 0


@_data_errors
def run_import(args) -> int:

    if args.src and not args.tgt:
        raise UsageError("--src needs --tgt (the target side of the parallel corpus)")
    if args.tgt and not args.src:
        raise UsageError("--tgt needs --src")
    # every flag before anything is read or written (the data layer checks again, naming its arguments)
    for flag in ("shard_rows", "block_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.vocab_size is not None:
        if args.tokenizer_file:
            raise UsageError("--vocab-size: not used with --tokenizer-file (the file fixes the vocabulary)")
        try:
            check_vocab_size(args.tokenizer, args.vocab_size)
        except ValueError as e:
            raise UsageError(f"--vocab-size: {str(e).split(': ', 1)[1]}") from None
    common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, shard_rows=args.shard_rows,
                  tokenizer_file=args.tokenizer_file)
    if args.val_fraction is not None and not args.text:
        raise UsageError("--val-fraction: only with --text (import a parallel corpus's validation side with "
                         "--tokenizer-file)")
    if args.val_fraction is not None:
        if not 0.0 < args.val_fraction < 1.0:
            raise UsageError(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
        for out in import_text_split(args.text, args.out, args.val_fraction, block_size=args.block_size, **common):
            print(_summary(out))
        return 0
    if args.text:
        out = import_text(args.text, args.out, block_size=args.block_size, **common)
    else:
        out = import_parallel(args.out, src=args.src, tgt=args.tgt, tsv=args.tsv, **common)
    print(_summary(out))
    return 0


@_data_errors
def run_inspect(args) -> int:

    d = Path(args.dir)
    # a `data prepare` directory holds train/ and val/: inspect both
    dirs = [d / s for s in ("train", "val")] if not (d / "manifest.json").exists() and (d / "train").is_dir() else [d]
    for sub in dirs:
        ds = open_dataset(sub, verify=not args.no_verify)
        print(_summary(sub))
        for i in range(min(args.rows, len(ds))):
            print(f"row {i}: {_decode_row(ds, i)}")
    return 0


def _summary(d: Path) -> str:
    m = read_manifest(d)  # checked: kind, info, shards, tokenizer; the rest is shown as found
    info = m["info"]
    lines = [f"{d}: task {m.get('task', info['name'])} ({m['kind']}), {m.get('rows', '?')} rows, "
             f"{m.get('tokens', '?')} tokens, {len(m['shards'])} shard(s), schema v{m['schema_version']}"]
    if m.get("tokenizer"):
        t = m["tokenizer"]
        lines.append(f"  tokenizer {t.get('kind')} ({t['file']}, sha256 {t['sha256'][:12]}…), vocab {m['vocab_size']}, "
                     f"special ids {m.get('special_ids')}")
    dims = {k: v for k, v in info.items() if k not in ("name", "kind", "extra") and v}
    lines.append(f"  columns {m.get('columns')}; info {dims}")
    return "\n".join(lines)


def _decode_row(ds, i: int) -> str:
    tok = ds.tokenizer
    if ds.kind == "seq2seq":
        s, t = ds.columns["src"].row(i), ds.columns["tgt"].row(i)
        return f"{tok.decode(s)!r} -> {tok.decode(t)!r}" if tok else f"{s.tolist()} -> {t.tolist()}"
    if ds.kind == "lm":
        r = ds.columns["tokens"].row(i)
        return repr(tok.decode(r)) if tok else str(r.tolist())
    x = ds.columns["x"].take(np.array([i]))[0]
    y = ds.columns["y"].take(np.array([i]))[0]
    return f"x={np.array2string(x[:8], precision=3)}{'…' if len(x) > 8 else ''} y={y}"
