"""Evaluation vs training throughput of one model on real data, in target tokens per second (a benchmark, not a test).

    .venv/bin/python bench/eval_throughput.py --config configs/shakespeare.toml --data /tmp/shk/data
    .venv/bin/python bench/eval_throughput.py --config configs/multi30k.toml --data /tmp/m30k/data --eval-rows 256

Train: `--train-steps` steps of the config's global batch on one worker (TaskModel.loss forward + backward + the
optimizer step: what the trainer times). Eval: the trainer's evaluation (TaskModel.metric_sums: forward only, and
for seq2seq the one decode per batch that gives exact match and BLEU) over the first `--eval-rows` validation rows,
at each of `--eval-batch-sizes`; for seq2seq also the teacher-forced forward alone. Every figure is the best of
`--repeat` interleaved rounds (the machine is shared: the best is the least disturbed). BLAS threads are pinned (`--threads`).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _tokens(batch) -> int:
    tgt = batch.get("tgt_out", batch.get("y"))
    return int(np.count_nonzero(tgt))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="prepared data directory (train/ and val/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--eval-rows", type=int, default=0, help="validation rows (0: all)")
    p.add_argument("--eval-batch-sizes", default="64,256,1024")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from ndtrain.launch.optimizer_setup import make_optimizer
    from ndtrain.launch.task_data import load_task_data, make_loader
    from ndtrain.engine.params import ParamStore
    from ndtrain.launch.config import apply_overrides, load_config, validate
    from ndtrain.launch.models import build_model

    from ndtrain.cluster.worker_process import set_up_process_memory
    set_up_process_memory()  # as every trainer process does (freed memory kept: no page faults per batch)
    cfg = load_config(args.config)
    apply_overrides(cfg, [f"data.dir={args.data}", "run.workers=1", "run.backend=local", *args.set])
    validate(cfg)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        info, train, val = load_task_data(cfg)
        model = build_model(cfg.run.model, info, cfg)
        model.set_tokenizer(getattr(train, "tokenizer", None))
        store = ParamStore.from_module(model.module, dtype=np.dtype(cfg.run.dtype), seed=cfg.run.seed)
        opt = make_optimizer(cfg.optim, store)
        batches = iter(make_loader(train, cfg, 0, 1))
        for _ in range(3):  # warm-up (first-touch of the buffers)
            store.zero_grad()
            _, count, backward = model.loss(next(batches), train=True)
            backward(1.0 / count)
            opt.step(cfg.optim.lr * 0.1)  # a real update: eval then sees a model that has moved off its init
        model.module.eval()
        n = min(val.n_rows(), args.eval_rows) if args.eval_rows else val.n_rows()
        sizes = [int(x) for x in args.eval_batch_sizes.split(",")]
        evals = {size: [val.batch(np.arange(s0, min(n, s0 + size))) for s0 in range(0, n, size)] for size in sizes}
        best_train, best, best_tf, sums = 0.0, dict.fromkeys(sizes, 0.0), dict.fromkeys(sizes, 0.0), {}
        for _ in range(args.repeat):  # interleaved: train, then every eval size, repeat (the load drifts)
            model.module.train()
            toks, t0 = 0, time.perf_counter()
            for _ in range(args.train_steps):
                batch = next(batches)
                store.zero_grad()
                _, count, backward = model.loss(batch, train=True)
                backward(1.0 / count)
                opt.step(cfg.optim.lr * 0.1)
                toks += _tokens(batch)
            best_train = max(best_train, toks / (time.perf_counter() - t0))
            model.module.eval()
            for size in sizes:
                toks = sum(_tokens(b) for b in evals[size])
                t0 = time.perf_counter()
                sums[size] = {}
                for b in evals[size]:
                    for k, v in model.metric_sums(b).items():
                        sums[size][k] = sums[size].get(k, 0.0) + v
                best[size] = max(best[size], toks / (time.perf_counter() - t0))
                if info.kind == "seq2seq":  # the teacher-forced part alone (loss, token accuracy), no decode
                    t0 = time.perf_counter()
                    for b in evals[size]:
                        for c0 in range(0, len(b["src"]), model.EVAL_CHUNK_ROWS):
                            rows = np.argsort((b["src"] != 0).sum(1))[c0:c0 + model.EVAL_CHUNK_ROWS]
                            model._logits_real(b["src"][rows], b["tgt_in"][rows], b["tgt_out"][rows])
                    best_tf[size] = max(best_tf[size], toks / (time.perf_counter() - t0))
        print(f"{cfg.run.task} / {cfg.run.model}: {store.size:,} parameters, {args.threads} BLAS thread(s)")
        print(f"train   batch {cfg.run.batch_size:5d}: {best_train:10,.0f} target tokens/s")
        for size in sizes:
            toks = sum(_tokens(b) for b in evals[size])
            tf = best_tf[size]
            extra = f"; teacher-forced forward alone {tf:10,.0f} ({tf / best_train:.2f}x)" if tf else ""
            shown = ", ".join(f"{k} {v:.4g}" for k, v in model.finalize(sums[size]).items())
            print(f"eval    batch {size:5d}: {best[size]:10,.0f} target tokens/s = {best[size] / best_train:.2f}x "
                  f"train{extra}  [{n} rows, {toks:,} tokens; {shown}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
