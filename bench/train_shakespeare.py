"""Proof run: a char-level GPT on tinyshakespeare with nanoGPT's small CPU configuration; target val loss <= 1.88.

    .venv/bin/python bench/train_shakespeare.py /work/shared/data/tinyshakespeare/input.txt [--json out.json]

nanoGPT's README command, reproduced: `train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` (and from that config: lr 1e-3, min_lr 1e-4, warmup 100,
beta2 0.99, weight decay 0.1, grad clip 1.0). The first 90 % of the file trains, the last 10 % validates. Batches
are random windows of the text as in nanoGPT's get_batch (a small in-script batcher over data.tokenizer's char
ids). The reported val loss is over EVERY non-overlapping 64-char block of the validation text (nanoGPT's figure
is the mean of 20 random batches; both average over all context positions 0..63). Ends with a sample (temperature
0.8, top-k 200: nanoGPT's sample.py defaults) drawn through the IncrementalDecoder protocol (KV cache, sliding
over the last 64 chars).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ndtrain.data.info import TaskInfo  # noqa: E402
from ndtrain.data.tokenizer import CharTokenizer  # noqa: E402
from ndtrain.engine.clip import clip_grad_norm  # noqa: E402
from ndtrain.engine.optim import AdamW  # noqa: E402
from ndtrain.engine.params import ParamStore  # noqa: E402
from ndtrain.engine.schedules import warmup_cosine  # noqa: E402
from ndtrain.launch.models import build_model  # noqa: E402


def random_batch(data: np.ndarray, B: int, T: int, rng: np.random.Generator) -> dict:
    """nanoGPT's get_batch: B random windows; x = data[i:i+T], y = data[i+1:i+T+1]."""
    ix = rng.integers(0, len(data) - T, B)
    w = data[ix[:, None] + np.arange(T + 1)]  # (B, T + 1)
    return {"x": w[:, :-1], "y": w[:, 1:]}


def full_eval(model, data: np.ndarray, T: int, batch_rows: int = 64) -> dict:
    """Loss over every non-overlapping block of `data` (all but the last partial block)."""
    n = (len(data) - 1) // T
    sums: dict[str, float] = {}
    model.module.eval()
    for s in range(0, n, batch_rows):
        idx = np.arange(s, min(n, s + batch_rows)) * T
        w = data[idx[:, None] + np.arange(T + 1)]
        for k, v in model.metric_sums({"x": w[:, :-1], "y": w[:, 1:]}).items():
            sums[k] = sums.get(k, 0.0) + v
    model.module.train()
    return model.finalize(sums)


def estimate(model, data, B, T, rng, iters) -> float:
    """nanoGPT's estimate_loss: mean loss of `iters` random batches (eval mode)."""
    model.module.eval()
    losses = []
    for _ in range(iters):
        m = model.metric_sums(random_batch(data, B, T, rng))
        losses.append(m["loss_sum"] / m["count"])
    model.module.train()
    return float(np.mean(losses))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="path of tinyshakespeare's input.txt")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--sample-chars", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    text = open(args.text, encoding="utf-8").read()
    tok = CharTokenizer.train([text])
    ids = tok.encode(text)
    n_train = int(0.9 * len(ids))
    train, val = ids[:n_train], ids[n_train:]
    T, B = args.block_size, args.batch_size
    info = TaskInfo("text", "lm", tgt_vocab_size=tok.vocab_size, max_tgt_len=T)
    model = build_model("lm", info, {"n_layers": args.n_layers, "n_heads": args.n_heads, "d_model": args.d_model,
                                     "d_ff": 4 * args.d_model, "dropout": 0.0, "positional": "learned",
                                     "tie_embeddings": True})
    store = ParamStore.from_module(model.module, seed=args.seed)
    opt = AdamW(store, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    lr_at = warmup_cosine(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps, min_lr=args.min_lr)
    print(f"text: {len(ids):,} chars (train {len(train):,}, val {len(val):,}), vocab {tok.vocab_size}; "
          f"model {store.size:,} parameters", flush=True)

    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1)
    history = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        if args.eval_every and step % args.eval_every == 0 and step > 0:
            tr = estimate(model, train, B, T, eval_rng, args.eval_iters)
            va = estimate(model, val, B, T, eval_rng, args.eval_iters)
            history.append({"step": step, "train_loss": tr, "val_loss": va})
            print(f"step {step}: train loss {tr:.4f}, val loss {va:.4f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        batch = random_batch(train, B, T, rng)
        store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        backward(1.0 / count)
        clip_grad_norm(store.grad, 1.0)
        opt.step(lr=lr_at(step))
        if step % 100 == 0:
            print(f"iter {step}: loss {loss_sum / count:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    tr = estimate(model, train, B, T, eval_rng, args.eval_iters)
    va = estimate(model, val, B, T, eval_rng, args.eval_iters)
    full = full_eval(model, val, T)
    print(f"step {args.steps}: train loss {tr:.4f}, val loss {va:.4f} (20 random batches); val loss over all "
          f"{(len(val) - 1) // T} val blocks {full['loss']:.4f} (perplexity {full['perplexity']:.2f}); "
          f"training {train_s:.0f}s, {1000 * train_s / args.steps:.0f} ms/step", flush=True)
    model.module.eval()
    prompt = tok.encode("\n")[None, :]
    out = model.generate(prompt, args.sample_chars, temperature=0.8, top_k=200, rng=args.seed)
    sample = "".join(tok.tokens[i] for i in out[0].tolist() if i >= 4)  # specials (never in the text) dropped
    print("---- sample ----\n" + sample + "\n----------------", flush=True)
    result = {"steps": args.steps, "params": int(store.size), "train_seconds": round(train_s, 1),
              "ms_per_step": round(1000 * train_s / args.steps, 1), "train_loss_est": tr, "val_loss_est": va,
              "val_loss_full": full["loss"], "val_perplexity": full["perplexity"], "history": history,
              "sample": sample}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
