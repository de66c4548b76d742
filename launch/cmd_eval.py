"""`ndtrain eval`: the loss and the task's metrics of a trained run, on its validation rows (or another split).

    ndtrain eval --run runs/reverse                       # an aligned table
    ndtrain eval --run runs/m30k --data data/m30k --json  # one JSON object (for scripts and CI)

Metrics are the model's own (TaskModel.metric_sums / finalize, exactly what the trainer logs): accuracy or mse for
vector tasks; loss, perplexity, token accuracy, exact match and BLEU for seq2seq; loss, perplexity and token
accuracy for language models. The pass is forward only (no layer keeps backward state) over large batches, and a
seq2seq batch is decoded once (greedy, or --beam K with --lenpen) for exact match and BLEU together. BLEU
(sacreBLEU's corpus BLEU of the detokenized decodes, engine.metrics) is on for word/BPE tokenizers, or with --bleu
(a char task's BLEU counts whole output strings as single words: exact match is the better measure there).
BLAS threads are pinned as `train` pins them (--threads, default OMP_NUM_THREADS or all cores).

    ndtrain average --run runs/m30k --last 5 && ndtrain eval --run runs/m30k --checkpoint avg --beam 5 --lenpen 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from ndtrain.launch.errors import UsageError
from ndtrain.data.loader import Loader
from ndtrain.launch.restore import RunError, load_run, pinned_threads, split_dataset
from ndtrain.launch.rundir import _jsonable


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run (loss, accuracy, exact match, perplexity, BLEU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (written by ndtrain train)")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's data.dir or task)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which split (default val)")
    p.add_argument("--batch-size", type=int, help="rows per eval batch (default: the run's eval_batch_size)")
    bleu = p.add_mutually_exclusive_group()
    bleu.add_argument("--bleu", dest="bleu", action="store_true", default=None, help="always compute BLEU (seq2seq)")
    bleu.add_argument("--no-bleu", dest="bleu", action="store_false", help="never compute BLEU")
    p.add_argument("--beam", type=int, metavar="K", help="decode with beam search of K beams (default: the run's "
                                                          "model.eval_beam_size)")
    add_decoding_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=main)


def add_decoding_args(p) -> None:
    """--checkpoint, --threads, --lenpen, --lenpen-kind: shared by eval and generate (generate adds --beam itself)."""
    p.add_argument("--checkpoint", metavar="NAME", default=None,
                   help="latest (default), avg (from `ndtrain average`), a step number or a checkpoint JSON path")
    p.add_argument("--threads", type=int, metavar="N", help="BLAS threads (default OMP_NUM_THREADS or all cores)")
    p.add_argument("--lenpen", type=float, metavar="A",
                   help="length penalty alpha of beam search (default: the run's model.length_penalty)")
    p.add_argument("--lenpen-kind", choices=("gnmt", "fairseq"),
                   help="gnmt ((5 + len) / 6) ** A or fairseq len ** A (default: the run's model.length_penalty_kind)")


def apply_decoding_args(model, args, beam: int | None) -> None:
    """--beam / --lenpen / --lenpen-kind onto a Seq2SeqModel's eval decoding (other models have none)."""
    if beam is not None:
        if beam < 1:
            raise UsageError(f"--beam: must be >= 1, got {beam}")
        model.eval_beam_size = beam
    if getattr(args, "lenpen", None) is not None:
        model.length_penalty = float(args.lenpen)
    if getattr(args, "lenpen_kind", None) is not None:
        model.length_penalty_kind = args.lenpen_kind


def evaluate(run, dataset, batch_size: int | None = None, bleu: bool | None = None) -> dict:
    """Metrics of the restored run (launch.restore.Restored) over every row of dataset, summed as the trainer sums
    them (one rank). bleu=None: BLEU only for seq2seq with a word/BPE tokenizer (TaskModel.set_tokenizer)."""
    model = run.model
    if bleu is not None:
        model.set_tokenizer(run.tokenizer, bleu=bleu and run.tokenizer is not None)
    sums: dict[str, float] = {}
    size = batch_size or run.cfg.run.eval_batch_size
    for batch in Loader.for_eval(dataset, size, 0, 1):
        if not len(next(iter(batch.values()))):
            continue
        for k, v in model.metric_sums(batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if not sums:
        raise ValueError(f"{dataset.source}: the split has no rows")
    return dict(model.finalize(sums))


def result(run, dataset, metrics: dict, split: str, seconds: float) -> dict:
    return {"run": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step, "task": run.info.name,
            "model": run.cfg.run.model, "split": split, "data": dataset.source, "rows": int(dataset.n_rows()),
            "seconds": seconds, "metrics": metrics}


def print_table(res: dict, file=None) -> None:
    from rich.console import Console  # rich: only the table view needs it
    from rich.table import Table  # rich: only the table view needs it
    console = Console(file=file or sys.stdout, width=120)
    console.print(f"{res['run']}: step {res['step']}, {res['task']} / {res['model']}, {res['split']} split "
                  f"({res['rows']} rows), {res['seconds']:.2f}s", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res["metrics"].items():
        table.add_row(k, _fmt(v))
    console.print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4e}"
    return str(v)


def main(args) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size: must be >= 1, got {args.batch_size}")
    with pinned_threads(args.threads):
        run = load_run(args.run, data_dir=args.data, checkpoint=args.checkpoint)
        apply_decoding_args(run.model, args, args.beam)
        dataset = split_dataset(run.cfg, args.split, data_dir=args.data, expect=run.info if args.data else None)
        t0 = time.perf_counter()
        try:
            metrics = evaluate(run, dataset, args.batch_size, args.bleu)
        except ValueError as e:
            raise RunError(str(e)) from None
    res = result(run, dataset, metrics, args.split, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(_jsonable(res)))
    else:
        print_table(res)
    return 0


__all__ = ["evaluate", "add_decoding_args", "apply_decoding_args", "result", "print_table", "add_parser", "main"]
