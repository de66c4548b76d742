"""Evaluation vs training throughput of one model on real data, in target tokens per second (a benchmark, not a test).

    .venv/bin/python bench/eval_throughput.py --config configs/shakespeare.toml --data /tmp/shk/data
    .venv/bin/python bench/eval_throughput.py --config configs/multi30k.toml --data /tmp/m30k/data --run RUN_DIR

Train: `--train-steps` steps of the config's global batch on one worker (TaskModel.loss forward + backward + the
optimizer step: what the trainer times). Eval: the trainer's evaluation (TaskModel.metric_sums: forward only, and
for seq2seq the one decode per batch that gives exact match and BLEU) over the first `--eval-rows` validation rows,
at each of `--eval-batch-sizes`. For seq2seq also its two parts alone, as metric_sums runs them (the same
length-sorted chunks): the teacher-forced pass (encoder, decoder, loss and token accuracy) and the decode (the
config's model.eval_beam_size). Every figure is the best of `--repeat` interleaved rounds (the machine is shared: the
best is the least disturbed); the last line prints the eval / train ratio. BLAS threads are pinned (`--threads`).

`--run DIR` loads the parameters of a trained run's newest checkpoint (its config must build the same model), so the
decode sees a model that ends its sentences (an untrained model decodes every hypothesis to the length limit); the
timed training steps then use lr 0 (the same work, the parameters stay as loaded).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _tokens(batch) -> int:
    tgt = batch.get("tgt_out", batch.get("y"))
    return int(np.count_nonzero(tgt))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _seq2seq_parts(model, batches) -> tuple:
    """The teacher-forced pass and the decode of metric_sums, each alone over every chunk of the batches."""
    PAD = 0

    def chunks():
        for b in batches:
            src, tgt_in, tgt_out = (np.asarray(b[k], np.int32) for k in ("src", "tgt_in", "tgt_out"))
            src_len, tgt_len = (src != PAD).sum(axis=1), (tgt_out != PAD).sum(axis=1)
            for rows in model.eval_chunks(src, tgt_out):
                S, T = max(1, int(src_len[rows].max())), max(1, int(tgt_len[rows].max()))
                yield src[rows, :S], tgt_in[rows, :T], tgt_out[rows, :T]

    generated = [0]

    def teacher_forced():
        for src, tgt_in, tgt_out in chunks():
            memory = model.module.encode(src, train=False)[:2]
            model.teacher_forced_sums(src, tgt_in, tgt_out, memory)

    def decode():
        generated[0] = 0
        for src, _, tgt_out in chunks():
            max_len = max(tgt_out.shape[1], model.max_decode_len or 0) if model.detokenize else tgt_out.shape[1]
            generated[0] += int(np.count_nonzero(model.decode(src, max_len=max_len)))

    return teacher_forced, decode, generated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="prepared data directory (train/ and val/)")
    p.add_argument("--run", help="a trained run directory: evaluate (and time training on) its newest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--eval-rows", type=int, default=0, help="validation rows (0: all)")
    p.add_argument("--eval-batch-sizes", default="64,256,1024")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from ndtrain.cluster import checkpoint as ckpt
    from ndtrain.cluster.worker_process import set_up_process_memory
    from ndtrain.engine.params import ParamStore
    from ndtrain.launch.config import apply_overrides, load_config, validate
    from ndtrain.launch.models import build_model
    from ndtrain.launch.optimizer_setup import make_optimizer
    from ndtrain.launch.restore import load_checkpoint
    from ndtrain.launch.task_data import load_task_data, make_loader

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
        lr = cfg.optim.lr * 0.1  # a real update: eval then sees a model that has moved off its init
        if args.run:
            c = load_checkpoint(Path(args.run))
            ckpt.restore(c, store, model.module)
            print(f"parameters of {c.path} (step {c.step})")
            lr = 0.0
        batches = iter(make_loader(train, cfg, 0, 1))

        def train_steps():
            toks = 0
            for _ in range(args.train_steps):
                batch = next(batches)
                store.zero_grad()
                _, count, backward = model.loss(batch, train=True)
                backward(1.0 / count)
                opt.step(lr)
                toks += _tokens(batch)
            return toks

        args_steps, args.train_steps = args.train_steps, 3
        train_steps()  # warm-up (first-touch of the buffers)
        args.train_steps = args_steps
        model.module.eval()
        n = min(val.n_rows(), args.eval_rows) if args.eval_rows else val.n_rows()
        sizes = [int(x) for x in args.eval_batch_sizes.split(",")]
        evals = {size: [val.batch(np.arange(s0, min(n, s0 + size))) for s0 in range(0, n, size)] for size in sizes}
        seq2seq = info.kind == "seq2seq"
        best_train, best, sums = 0.0, dict.fromkeys(sizes, 0.0), {}
        best_tf, best_dec, generated = dict.fromkeys(sizes, 0.0), dict.fromkeys(sizes, 0.0), {}
        for _ in range(args.repeat):  # interleaved: train, then every eval size, repeat (the load drifts)
            model.module.train()
            t0 = time.perf_counter()
            toks = train_steps()
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
                if seq2seq:
                    teacher_forced, decode, gen = _seq2seq_parts(model, evals[size])
                    best_tf[size] = max(best_tf[size], toks / _timed(teacher_forced))
                    best_dec[size] = max(best_dec[size], toks / _timed(decode))
                    generated[size] = gen[0]
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
        print(f"{cfg.run.task} / {cfg.run.model}: {store.size:,} parameters, {args.threads} BLAS thread(s), "
              f"best of {args.repeat}, load average at the end {load}")
        print(f"train   batch {cfg.run.batch_size:5d}: {best_train:10,.0f} target tokens/s")
        for size in sizes:
            toks = sum(_tokens(b) for b in evals[size])
            shown = ", ".join(f"{k} {v:.4g}" for k, v in model.finalize(sums[size]).items())
            print(f"eval    batch {size:5d}: {best[size]:10,.0f} target tokens/s = {best[size] / best_train:.2f}x "
                  f"train  [{n} rows, {toks:,} target tokens; {shown}]")
            if seq2seq:
                beam = model.eval_beam_size
                print(f"  teacher-forced pass alone: {best_tf[size]:10,.0f} target tokens/s = "
                      f"{best_tf[size] / best_train:.2f}x train")
                print(f"  decode alone ({'beam ' + str(beam) if beam > 1 else 'greedy'}): {best_dec[size]:10,.0f} "
                      f"target tokens/s = {best_dec[size] / best_train:.2f}x train "
                      f"({generated[size]:,} tokens generated, {generated[size] / toks * best_dec[size]:,.0f}/s)")
        size = sizes[-1]
        print(f"RATIO eval / train (batch {size}): {best[size] / best_train:.2f}x"
              + (f"; teacher-forced {best_tf[size] / best_train:.2f}x; decode {best_dec[size] / best_train:.2f}x"
                 if seq2seq else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
