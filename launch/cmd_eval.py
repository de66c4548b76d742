"""`ndtrain eval`: the loss and the task's metrics of a trained run, on its validation rows (or another split).

    ndtrain eval --run runs/reverse                       # an aligned table
    ndtrain eval --run runs/m30k --data data/m30k --json  # one JSON object (for scripts and CI)

Metrics are the model's own (TaskModel.metric_sums / finalize, exactly what the trainer logs): accuracy or mse for
vector tasks; loss, perplexity, token accuracy and exact match for seq2seq; loss, perplexity and token accuracy
for language models. BLEU (sacrebleu-compatible corpus BLEU of greedy/beam decodes, engine.metrics.corpus_bleu) is
added for seq2seq models whose tokenizer is word or BPE level, or with --bleu (a char task's BLEU counts whole
output strings as single words: exact match is the better measure there).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from ndtrain.data.loader import Loader
from ndtrain.engine.metrics import corpus_bleu
from ndtrain.launch.restore import RunError, load_run, split_dataset
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
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=main)


def evaluate(run, dataset, batch_size: int | None = None, bleu: bool | None = None) -> dict:
    """Metrics of the restored run (launch.restore.Restored) over every row of dataset, summed as the trainer sums
    them (one rank). bleu=None: BLEU only for seq2seq with a word/BPE tokenizer."""
    model = run.model
    sums: dict[str, float] = {}
    size = batch_size or run.cfg.run.eval_batch_size
    for batch in Loader.for_eval(dataset, size, 0, 1):
        if not len(next(iter(batch.values()))):
            continue
        for k, v in model.metric_sums(batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if not sums:
        raise ValueError(f"{dataset.source}: the split has no rows")
    metrics = dict(model.finalize(sums))
    tok = run.tokenizer
    if bleu is None:
        bleu = run.kind == "seq2seq" and tok is not None and getattr(tok, "kind", "") in ("word", "bpe")
    if bleu and run.kind == "seq2seq" and tok is not None:
        metrics["bleu"] = bleu_score(run, dataset, size)
    return metrics


def bleu_score(run, dataset, batch_size: int) -> float:
    """Corpus BLEU of the model's decodes (eval_beam_size, up to the task's max_tgt_len) against the targets."""
    hyps, refs = [], []
    for batch in Loader.for_eval(dataset, batch_size, 0, 1):
        if not len(batch["src"]):
            continue
        pred = run.model.decode(batch["src"])
        hyps += [run.tokenizer.decode(row) for row in pred]
        refs += [run.tokenizer.decode(row) for row in batch["tgt_out"]]
    return corpus_bleu(hyps, [refs]).score


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
    run = load_run(args.run, data_dir=args.data)
    dataset = split_dataset(run.cfg, args.split, data_dir=args.data, expect=run.info if args.data else None)
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size: must be >= 1, got {args.batch_size}")
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


__all__ = ["evaluate", "bleu_score", "result", "print_table", "add_parser", "main"]
