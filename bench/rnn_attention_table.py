"""The context bottleneck, measured: an RNN encoder-decoder with and without attention on `reverse`, as the
strings grow. Prints one table of held-out greedy exact match (rows: length; columns: attention none / bahdanau /
luong). Without attention the whole source must pass through the encoder's final state (Sutskever et al. 2014;
Cho et al. 2014 saw quality fall with length); attention reads every encoder state (Bahdanau et al. 2015).

    .venv/bin/python bench/rnn_attention_table.py --lengths 4,8,12,16 --steps 600

Each cell trains a fresh "seq2seq-rnn" TaskModel (the same adapter `ndtrain train --model seq2seq-rnn` builds) with
Adam on strings of exactly that length, then decodes held-out strings greedily (engine/decoding.py).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ndtrain.data.info import BOS, EOS, TaskInfo
from ndtrain.data.seq_tasks import DIGITS, is_val_key
from ndtrain.engine import ParamStore
from ndtrain.engine.metrics import sequence_exact_match
from ndtrain.engine.optim import Adam
from ndtrain.launch.models import build_model

N_SPECIAL = 4  # PAD UNK BOS EOS; digit d has id 4 + d (a fixed char alphabet)


def reverse_batch(rng, B: int, length: int, split: str) -> dict[str, np.ndarray]:
    """B reverse examples of exactly `length` digits from the split (train / val keys disjoint, as data/)."""
    rows = []
    while len(rows) < B:
        s = "".join(DIGITS[d] for d in rng.integers(0, 10, length))
        if is_val_key(("reverse", s)) == (split == "val"):
            rows.append(s)
    ids = np.array([[N_SPECIAL + int(c) for c in s] for s in rows], np.int32)  # (B, L)
    rev = ids[:, ::-1]
    col = lambda v: np.full((B, 1), v, np.int32)  # noqa: E731
    return {"src": np.concatenate([ids, col(EOS)], 1), "tgt_in": np.concatenate([col(BOS), rev], 1),
            "tgt_out": np.concatenate([rev, col(EOS)], 1)}


def run_cell(length, attention, args) -> tuple[float, float, float]:
    info = TaskInfo("reverse", "seq2seq", src_vocab_size=N_SPECIAL + 10, tgt_vocab_size=N_SPECIAL + 10,
                    max_src_len=length + 1, max_tgt_len=length + 1)
    model = build_model("seq2seq-rnn", info, {"cell": args.cell, "attention": attention,
                                              "hidden_size": args.hidden, "d_embed": args.embed})
    store = ParamStore.from_module(model.module, seed=args.seed)
    opt = Adam(store, lr=args.lr)
    rng = np.random.default_rng([args.seed, length])
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = reverse_batch(rng, args.batch, length, "train")
        store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        backward(1.0 / count)
        np.clip(store.grad, -1.0, 1.0, out=store.grad)  # exploding-gradient guard for the plain RNN runs
        opt.step(lr=args.lr * min(1.0, 2.0 * (1.0 - step / args.steps)))  # flat, then linear decay
    secs = time.perf_counter() - t0
    val = reverse_batch(np.random.default_rng([args.seed, length, 1]), args.n_val, length, "val")
    pred = model.decode(val["src"], max_len=length + 1)
    exact = float(sequence_exact_match(pred, val["tgt_out"]).mean())
    return exact, loss_sum / count, secs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4,8,12,16")
    p.add_argument("--attentions", default="none,bahdanau,luong")
    p.add_argument("--cell", default="gru", choices=["gru", "lstm"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits
    lengths = [int(v) for v in args.lengths.split(",")]
    atts = [a.strip() for a in args.attentions.split(",")]
    print(f"reverse, {args.cell.upper()} hidden {args.hidden}, {args.steps} steps x batch {args.batch}; "
          f"held-out greedy exact match (last train loss per token, train seconds)")
    print(f"{'length':>6s} " + " ".join(f"{a:>26s}" for a in atts))
    with threadpool_limits(args.threads, "blas"):
        for L in lengths:
            cells = []
            for a in atts:
                exact, loss, secs = run_cell(L, a, args)
                cells.append(f"{exact:7.3f} ({loss:.3f}, {secs:5.1f}s)")
            print(f"{L:6d} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
