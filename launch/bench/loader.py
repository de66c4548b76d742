"""`ndtrain bench loader`: how fast the loader turns memory-mapped shards into padded, model-ready batches.

Synthetic shards (seq2seq: src and tgt rows of 16..48 tokens; lm: one token stream) of --tokens tokens in total are
written to a temporary directory. For W = 1 and 2 ranks (separate processes, started together) every rank iterates
one epoch of its parts of the global batches; the rate is all ranks' tokens / the slowest rank's time. Reported:
real tokens/s, padded tokens/s (what the model computes on), time to the first batch (open + validate + first
batch), and the ratio to what training consumes (--train-tok-s; the default is ANCHORS.md's ~10k tok/s).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from ndtrain.data.info import TaskInfo
from ndtrain.data.shards import write_dataset
from ndtrain.data.loader import Loader
from ndtrain.data.reader import open_dataset
from ndtrain.launch.errors import UsageError

MODES = ("seq2seq", "seq2seq-bucketed", "lm")


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=float, default=10e6, help="tokens in the synthetic data set")
    parser.add_argument("--batch-size", type=int, default=64, help="rows (lm: blocks) per rank per batch")
    parser.add_argument("--block-size", type=int, default=256, help="lm block length")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--train-tok-s", type=float, default=10_000.0,
                        help="tokens/s a training step consumes, for the ratio column")
    parser.add_argument("--dir", default=None, help="write the shards here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def make_shards(root: Path, n_tokens: int, seed: int = 0) -> dict[str, Path]:

    rng = np.random.default_rng(seed)
    vocab = 8000
    n_rows = max(1, int(n_tokens // 64))  # src + tgt lengths average 64
    src_len, tgt_len = rng.integers(16, 49, n_rows), rng.integers(16, 49, n_rows)
    values = rng.integers(4, vocab, int(src_len.sum() + tgt_len.sum()), dtype=np.int32)
    cut = np.cumsum(np.concatenate([src_len, tgt_len]))[:-1]
    pieces = np.split(values, cut)
    info = TaskInfo("synthetic", "seq2seq", src_vocab_size=vocab, tgt_vocab_size=vocab, max_src_len=48,
                    max_tgt_len=49)
    s2s = write_dataset(root / "seq2seq", info, {"src": pieces[:n_rows], "tgt": pieces[n_rows:]}, shard_rows=32768)
    lm_info = TaskInfo("synthetic-lm", "lm", tgt_vocab_size=vocab, max_tgt_len=256)
    docs = np.split(rng.integers(4, vocab, int(n_tokens), dtype=np.int32), 16)  # 16 documents
    lm = write_dataset(root / "lm", lm_info, {"tokens": docs}, shard_rows=4)
    return {"seq2seq": s2s, "lm": lm}


def _rank_run(args) -> dict:
    data_dir, mode, B, W, rank, block, start = args

    while time.time() < start:  # ranks start together
        time.sleep(0.001)
    t0 = time.perf_counter()
    ds = open_dataset(data_dir)
    kw = {"block_size": block} if mode == "lm" else {"bucket": mode.endswith("bucketed")}
    loader = Loader(ds, B * W, rank=rank, world_size=W, seed=0, endless=False, **kw)
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter() - t0
    real = padded = 0
    t1 = time.perf_counter()
    for b in [first] if False else _chain(first, it):
        if mode == "lm":
            real += b["x"].size
            padded += b["x"].size
        else:
            real += int(np.count_nonzero(b["src"])) + int(np.count_nonzero(b["tgt_out"]))
            padded += b["src"].size + b["tgt_out"].size
    elapsed = time.perf_counter() - t1
    return {"rank": rank, "first_batch_s": t_first, "seconds": elapsed, "real_tokens": real, "padded_tokens": padded,
            "batches": loader.epoch_batches}


def _chain(first, it):
    yield first
    yield from it


def run_world(data_dir: Path, mode: str, B: int, W: int, block: int) -> dict:
    start = time.time() + 0.5
    jobs = [(str(data_dir), mode, B, W, r, block, start) for r in range(W)]
    if W == 1:
        results = [_rank_run(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(W) as pool:
            start = time.time() + 2.0  # spawn start-up is slow: leave room so the ranks really start together
            results = pool.map(_rank_run, [j[:-1] + (start,) for j in jobs])
    slowest = max(r["seconds"] for r in results)
    real = sum(r["real_tokens"] for r in results)
    padded = sum(r["padded_tokens"] for r in results)
    return {"mode": mode, "world_size": W, "batch_per_rank": B, "batches": results[0]["batches"],
            "real_tok_s": real / slowest, "padded_tok_s": padded / slowest, "pad_fraction": 1 - real / padded,
            "first_batch_s": max(r["first_batch_s"] for r in results), "seconds": slowest}


def main(args) -> int:
    ranks = [int(w) for w in str(args.ranks).split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:

            raise UsageError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    tmp = None
    if args.dir:
        root = Path(args.dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ndtrain-bench-loader-")
        root = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        dirs = make_shards(root, int(args.tokens))
        write_s = time.perf_counter() - t0
        rows = []
        for mode in modes:
            d = dirs["lm" if mode == "lm" else "seq2seq"]
            for W in ranks:
                r = run_world(d, mode, args.batch_size, W, args.block_size)
                r["x_training"] = r["real_tok_s"] / args.train_tok_s
                rows.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps({"tokens": int(args.tokens), "write_s": write_s, "train_tok_s": args.train_tok_s,
                          "results": rows}, indent=1))
        return 0
    print(f"loader benchmark: {int(args.tokens):,} tokens, shards written in {write_s:.2f} s "
          f"(timings taken on a shared machine: noisy)")
    print(f"{'mode':<18}{'W':>3}{'batches':>9}{'real Mtok/s':>13}{'padded Mtok/s':>15}{'pad %':>7}"
          f"{'1st batch s':>13}{'x training':>12}")
    for r in rows:
        print(f"{r['mode']:<18}{r['world_size']:>3}{r['batches']:>9}{r['real_tok_s'] / 1e6:>13.1f}"
              f"{r['padded_tok_s'] / 1e6:>15.1f}{100 * r['pad_fraction']:>7.1f}{r['first_batch_s']:>13.3f}"
              f"{r['x_training']:>12.0f}")
    return 0
