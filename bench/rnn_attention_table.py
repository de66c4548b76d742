"""The context bottleneck, measured: an RNN encoder-decoder with and without attention on `reverse`, as the
strings grow (and, with --dates, on the `dates` task). Prints one table of held-out greedy exact match (rows: length; columns: attention none / bahdanau /
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


def pad_pairs(src: list, tgt: list) -> dict[str, np.ndarray]:
    """Token lists -> a padded seq2seq batch (src + EOS; BOS + tgt; tgt + EOS), PAD = 0."""
    B = len(src)
    S, T = max(len(s) for s in src) + 1, max(len(t) for t in tgt) + 1
    out = {"src": np.zeros((B, S), np.int32), "tgt_in": np.zeros((B, T), np.int32),
           "tgt_out": np.zeros((B, T), np.int32)}
    for b, (s, t) in enumerate(zip(src, tgt)):
        out["src"][b, :len(s) + 1] = list(s) + [EOS]
        out["tgt_in"][b, :len(t) + 1] = [BOS] + list(t)
        out["tgt_out"][b, :len(t) + 1] = list(t) + [EOS]
    return out


class DatesSampler:
    """Batches of the built-in `dates` task (many human formats -> ISO), train / val as data/tasks.py splits."""

    def __init__(self, n_train: int, n_val: int, seed: int):
        from ndtrain.data.tasks import generate
        self.info, tr = generate("dates", n_train, seed, "train")
        _, self.val_rows = generate("dates", n_val, seed, "val")
        self.train_rows = tr

    def batch(self, rng, B: int) -> dict[str, np.ndarray]:
        idx = rng.integers(0, len(self.train_rows["src"]), B)
        return pad_pairs([self.train_rows["src"][i] for i in idx], [self.train_rows["tgt"][i] for i in idx])

    def val(self) -> dict[str, np.ndarray]:
        return pad_pairs(self.val_rows["src"], self.val_rows["tgt"])


def run_cell(length, attention, args, dates: DatesSampler | None = None) -> tuple[float, float, float]:
    if dates is not None:
        info = dates.info
    else:
        info = TaskInfo("reverse", "seq2seq", src_vocab_size=N_SPECIAL + 10, tgt_vocab_size=N_SPECIAL + 10,
                        max_src_len=length + 1, max_tgt_len=length + 1)
    model = build_model("seq2seq-rnn", info, {"cell": args.cell, "attention": attention,
                                              "hidden_size": args.hidden, "d_embed": args.embed})
    store = ParamStore.from_module(model.module, seed=args.seed)
    opt = Adam(store, lr=args.lr)
    rng = np.random.default_rng([args.seed, length, int(dates is not None)])
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = dates.batch(rng, args.batch) if dates else reverse_batch(rng, args.batch, length, "train")
        store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        backward(1.0 / count)
        np.clip(store.grad, -1.0, 1.0, out=store.grad)  # exploding-gradient guard for the plain RNN runs
        opt.step(lr=args.lr * min(1.0, 2.0 * (1.0 - step / args.steps)))  # flat, then linear decay
    secs = time.perf_counter() - t0
    if dates is not None:
        val = dates.val()
    else:
        val = reverse_batch(np.random.default_rng([args.seed, length, 1]), args.n_val, length, "val")
    pred = model.decode(val["src"], max_len=val["tgt_out"].shape[1])
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
    p.add_argument("--dates", action="store_true", help="add a row for the built-in `dates` task")
    p.add_argument("--dates-rows", type=int, default=20000, help="training rows drawn for `dates`")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits
    lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
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
        if args.dates:
            sampler = DatesSampler(args.dates_rows, args.n_val, args.seed)
            cells = []
            for a in atts:
                exact, loss, secs = run_cell(0, a, args, sampler)
                cells.append(f"{exact:7.3f} ({loss:.3f}, {secs:5.1f}s)")
            print(f"{'dates':>6s} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
