"""Proof run: the `reverse` task (digit strings of length 1-12 over 10 symbols) with the encoder-decoder
Transformer, trained on one core; reports exact match on 1,000 held-out sequences (target >= 99 %).

    .venv/bin/python bench/train_reverse.py [--steps 3000] [--json out.json]

Held-out rows come from data.tasks.generate(split="val"): their digit strings hash into the validation bucket, so
the model never trained on them. Exact match is greedy decoding through the IncrementalDecoder protocol (KV cache).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: set before NumPy loads BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


from ndtrain.data import tasks  # noqa: E402
from ndtrain.data.loader import Loader  # noqa: E402
from ndtrain.engine.clip import clip_grad_norm  # noqa: E402
from ndtrain.engine.optim import AdamW  # noqa: E402
from ndtrain.engine.params import ParamStore  # noqa: E402
from ndtrain.engine.schedules import warmup_cosine  # noqa: E402
from ndtrain.launch.models import build_model  # noqa: E402


def evaluate(model, val, batch_size=250) -> dict:
    model.module.eval()
    sums: dict[str, float] = {}
    for batch in Loader.for_eval(val, batch_size):
        for k, v in model.metric_sums(batch).items():
            sums[k] = sums.get(k, 0.0) + v
    model.module.train()
    return model.finalize(sums)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--val-rows", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the final figures here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    info, train_cols = tasks.generate("reverse", args.train_rows, seed=args.seed, split="train")
    _, val_cols = tasks.generate("reverse", args.val_rows, seed=args.seed, split="val")
    train, val = (info, train_cols), (info, val_cols)
    print(f"data: {args.train_rows} train / {args.val_rows} held-out rows, vocab {info.tgt_vocab_size}, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    model = build_model("transformer", info, {
        "d_model": args.d_model, "n_heads": args.n_heads, "d_ff": args.d_ff, "dropout": 0.0,
        "n_enc_layers": args.layers, "n_dec_layers": args.layers})
    store = ParamStore.from_module(model.module, seed=args.seed)
    opt = AdamW(store, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    lr_at = warmup_cosine(lr=args.lr, warmup_steps=min(args.warmup, args.steps - 1), total_steps=args.steps, min_lr=args.lr / 20)
    loader = Loader(train, args.batch_size, seed=args.seed)
    print(f"model: {store.size:,} parameters", flush=True)

    t_train = time.perf_counter()
    running = None
    history = []
    for step, batch in zip(range(args.steps), loader):
        store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        backward(1.0 / count)
        clip_grad_norm(store.grad, 1.0)
        opt.step(lr=lr_at(step))
        running = loss_sum / count if running is None else 0.98 * running + 0.02 * loss_sum / count
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {running:.4f} lr {lr_at(step):.2e} "
                  f"({time.perf_counter() - t_train:.0f}s)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(model, val)
            history.append({"step": step + 1, **m})
            print(f"  eval: exact match {m['exact_match']:.4f} token acc {m['token_accuracy']:.4f} "
                  f"loss {m['loss']:.4f}", flush=True)
    train_s = time.perf_counter() - t_train
    m = evaluate(model, val)
    result = {"task": "reverse", "steps": args.steps, "batch_size": args.batch_size, "params": int(store.size),
              "train_seconds": round(train_s, 1), "ms_per_step": round(1000 * train_s / args.steps, 2),
              "held_out": args.val_rows, **{k: float(v) for k, v in m.items()}, "history": history}
    print(f"final: exact match {m['exact_match']:.4f} on {args.val_rows} held-out sequences, token accuracy "
          f"{m['token_accuracy']:.4f}, loss {m['loss']:.4f}; training {train_s:.0f}s "
          f"({result['ms_per_step']} ms/step)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
