"""Real data vs synthetic batches: target tokens/s of the same model on a seq2seq corpus and on random batches.

    ndtrain bench realdata DATA [--config configs/multi30k.toml] [--set k=v ...] [--steps 20] [--threads 1] [--json]

DATA is an imported directory (holding train/ and val/, as bench/run_multi30k.sh writes), or a raw Multi30k
directory (train.en.gz, train.de.gz, val.en.gz, val.de.gz), which is imported first into a temporary directory
(BPE, --vocab-size ids, as run_multi30k.sh does). The model and optimizer come from --config (default the
Multi30k preset) plus --set overrides. Timed modes, interleaved step by step (the machine's
drift hits every mode alike), each a full training step (forward, loss, backward, AdamW):
  real       length-bucketed batches of the training split (data.bucket = true whatever the config says, or its
             data.max_tokens budget; --set data.bucket=false measures the config's random batches instead)
  plain      the same rows in random batches padded to their longest (no bucketing): what bucketing saves
  before     the plain batches through the output path before issue 14: the logits of every position, pads included
             (module forward, then cross_entropy_fused over all rows): what gathering the real rows saves
  synthetic  random ids, no padding, batch_size rows of the training split's mean source / target length
Target tokens/s counts real (non-PAD) target tokens. pad_fraction: PAD share of the positions computed (source +
decoder input). Eval: the forward-only teacher-forced loss (module.loss, train=False: output layer on the real rows
only) over the validation rows in eval_batch_size batches, and the trainer's evaluation (model.metric_sums: loss,
accuracy, decoding) on --eval-rows rows.
The issue's target: real >= 0.75 x synthetic.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ndtrain.data.info import PAD
from ndtrain.data.loader import Loader
from ndtrain.data.shards import TOKENIZER_FILE
from ndtrain.engine import ParamStore
from ndtrain.engine.losses import cross_entropy_fused
from ndtrain.engine.memory import retain_freed_memory
from ndtrain.launch.cli import main as cli
from ndtrain.launch.config import apply_overrides, load_config, validate
from ndtrain.launch.errors import UsageError
from ndtrain.launch.models import build_model
from ndtrain.launch.optimizer_setup import make_optimizer
from ndtrain.launch.task_data import load_task_data, make_loader

RAW_FILES = ("train.en.gz", "train.de.gz", "val.en.gz", "val.de.gz")
TARGET_RATIO = 0.75
MODES = ("real", "plain", "before", "synthetic")


def add_arguments(p) -> None:
    p.add_argument("data", help="imported dir (train/ + val/) or raw Multi30k dir (train.en.gz ...)")
    p.add_argument("--config", default=None, help="run config (default: configs/multi30k.toml of this checkout)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    p.add_argument("--eval-rows", type=int, default=256, help="validation rows for the trainer's evaluation timing")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="joint BPE ids when DATA is a raw corpus (default 8000, the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _default_config() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "multi30k.toml"


def _import_raw(raw: Path, out: Path, vocab_size: int) -> Path:
    """`ndtrain data import` of the raw corpus into out/{train,val} (stdout kept off ours)."""
    with contextlib.redirect_stdout(sys.stderr):
        for split, extra in (("train", ["--tokenizer", "bpe", "--vocab-size", str(vocab_size)]),
                             ("val", ["--tokenizer-file", str(out / "train" / TOKENIZER_FILE)])):
            rc = cli(["data", "import", "--src", str(raw / f"{split}.en.gz"), "--tgt", str(raw / f"{split}.de.gz"),
                      *extra, "--out", str(out / split)])
            if rc:
                raise SystemExit(rc)
    return out


def _resolve_data(data: str, vocab_size: int, stack: contextlib.ExitStack) -> Path:
    d = Path(data)
    if (d / "train" / "manifest.json").is_file() and (d / "val" / "manifest.json").is_file():
        return d
    if all((d / f).is_file() for f in RAW_FILES):
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ndtrain-realdata-")))
        return _import_raw(d, tmp, vocab_size)
    raise UsageError(f"{d}: neither an imported directory (train/manifest.json, val/manifest.json) nor a raw "
                     f"corpus ({', '.join(RAW_FILES)})")


def _setup(args, data_dir: Path):
    """(cfg, model, store, optimizer, train, val) as `ndtrain train` builds them, on one rank."""
    cfg = load_config(args.config or _default_config())
    cfg.data.bucket = True  # "real" = length-bucketed batches (unless --set says otherwise or max_tokens is set)
    apply_overrides(cfg, [*args.set, f'data.dir="{data_dir}"', 'run.backend="local"', "run.workers=1"])
    validate(cfg)
    info, train, val = load_task_data(cfg)
    if info.kind != "seq2seq":
        raise UsageError(f"{data_dir}: bench realdata needs seq2seq data; this is {info.kind}")
    model = build_model(cfg.run.model, info, cfg)
    store = ParamStore.from_module(model.module, dtype=np.dtype(cfg.run.dtype), seed=cfg.run.seed)
    return cfg, model, store, make_optimizer(cfg.optim, store), train, val


def _synthetic_batches(B: int, src_len: int, tgt_len: int, vocab: tuple[int, int], seed: int):
    """Endless random batches without padding: src (B, src_len), tgt_in/tgt_out (B, tgt_len)."""
    rng = np.random.default_rng(seed)
    while True:
        yield {"src": rng.integers(4, vocab[0], (B, src_len)).astype(np.int32),
               "tgt_in": rng.integers(4, vocab[1], (B, tgt_len)).astype(np.int32),
               "tgt_out": rng.integers(4, vocab[1], (B, tgt_len)).astype(np.int32)}


def _train_step(model, store, opt, batch, full_logits: bool = False) -> tuple[float, int]:
    t0 = time.perf_counter()
    store.zero_grad()
    if full_logits:  # every position's logits, then the loss: the training path before the gathered output layer
        logits, module_backward = model.module(batch["src"], batch["tgt_in"], train=True)  # (B, T, V)
        _, count, grad_fn = cross_entropy_fused(logits, batch["tgt_out"], ignore_index=PAD,
                                                label_smoothing=model.label_smoothing, inplace=True)
        module_backward(grad_fn(1.0 / max(count, 1)))
    else:
        _, count, backward = model.loss(batch, train=True)
        backward(1.0 / max(count, 1))
    opt.step(opt.lr)
    return time.perf_counter() - t0, count


def _time_eval(model, val, cfg, eval_rows: int) -> dict:
    """Forward-only teacher-forced loss over all validation rows, and the trainer's metric_sums on eval_rows."""
    module = model.module
    cut = {"max_src_len": module.cfg.max_len, "max_tgt_len": module.cfg.max_len}  # val rows past the model's reach
    module.eval()
    try:
        n, bs = val.n_rows(), cfg.run.eval_batch_size
        tokens, t0 = 0, time.perf_counter()
        for lo in range(0, n, bs):
            b = val.batch(np.arange(lo, min(n, lo + bs)), **cut)
            src, tgt_in, tgt_out = (np.asarray(b[k], np.int32) for k in ("src", "tgt_in", "tgt_out"))
            _, count, _ = module.loss(src, tgt_in, tgt_out, ignore_index=PAD, train=False)  # real rows only
            tokens += count
        forward_s = time.perf_counter() - t0
        m = min(n, eval_rows)
        m_tokens, t0 = 0, time.perf_counter()
        for lo in range(0, m, bs):
            b = val.batch(np.arange(lo, min(m, lo + bs)), **cut)
            m_tokens += int(model.metric_sums(b)["count"])
        metrics_s = time.perf_counter() - t0
    finally:
        module.train()
    return {"forward_tok_s": tokens / forward_s, "forward_s": forward_s, "rows": n,
            "metrics_tok_s": m_tokens / metrics_s if m else 0.0, "metrics_rows": m, "metrics_s": metrics_s}


def run(args) -> dict:
    retain_freed_memory()
    with contextlib.ExitStack() as stack:
        data_dir = _resolve_data(args.data, args.vocab_size, stack)
        cfg, model, store, opt, train, val = _setup(args, data_dir)
        info = train.info
        src_lens, tgt_lens = train.columns["src"].lengths(), train.columns["tgt"].lengths()
        # the synthetic twin: the mean lengths as the model sees them (target + BOS / EOS), batch_size rows
        src_len, tgt_len = max(1, round(float(src_lens.mean()))), max(1, round(float(tgt_lens.mean())) + 1)
        B = cfg.run.batch_size
        sources = {"real": iter(make_loader(train, cfg, 0, 1)),
                   "plain": iter(Loader(train, B, 0, 1, cfg.run.seed)),
                   "before": iter(Loader(train, B, 0, 1, cfg.run.seed)),
                   "synthetic": _synthetic_batches(B, src_len, tgt_len, (info.src_vocab_size, info.tgt_vocab_size),
                                                   cfg.run.seed)}
        times = {m: [] for m in MODES}
        tokens = {m: 0 for m in MODES}
        pads = {m: [0, 0] for m in MODES}
        for i in range(args.warmup + args.steps):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):  # alternate which mode goes first
                batch = next(sources[mode])
                dt, count = _train_step(model, store, opt, batch, full_logits=mode == "before")
                model.pad_stats()  # the model's own counter, reset: counted here per mode instead
                if i >= args.warmup:
                    times[mode].append(dt)
                    tokens[mode] += count
                    for k in ("src", "tgt_in"):
                        pads[mode][0] += int(np.count_nonzero(batch[k] == 0))
                        pads[mode][1] += batch[k].size
        train_rows = {}
        for mode in MODES:
            total = sum(times[mode])
            train_rows[mode] = {"tok_s": tokens[mode] / total, "tokens_per_step": tokens[mode] / len(times[mode]),
                                "step_ms_median": 1e3 * statistics.median(times[mode]),
                                "step_ms_min": 1e3 * min(times[mode]),
                                "pad_fraction": pads[mode][0] / pads[mode][1]}
        ev = _time_eval(model, val, cfg, args.eval_rows)
    ratio = train_rows["real"]["tok_s"] / train_rows["synthetic"]["tok_s"]
    return {"data": str(args.data), "config": str(args.config or _default_config()), "threads": args.threads,
            "batch_size": B, "bucket": bool(cfg.data.bucket), "max_tokens": int(cfg.data.max_tokens),
            "vocab": [info.src_vocab_size, info.tgt_vocab_size], "mean_src_len": float(src_lens.mean()),
            "mean_tgt_len": float(tgt_lens.mean()), "synthetic_shape": [B, src_len, tgt_len], "steps": args.steps,
            "train": train_rows, "pad_fraction": train_rows["real"]["pad_fraction"],
            "real_vs_synthetic": ratio, "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
            "eval": ev, "eval_vs_train": ev["forward_tok_s"] / train_rows["real"]["tok_s"]}


def main(args) -> int:
    with threadpool_limits(args.threads, user_api="blas"):
        r = run(args)
    if args.json:
        print(json.dumps(r), flush=True)
        return 0
    print(f"# {r['data']}: batch {r['batch_size']} rows, mean length src {r['mean_src_len']:.1f} / tgt "
          f"{r['mean_tgt_len']:.1f}, vocab {r['vocab']}, {r['threads']} thread(s), {r['steps']} steps per mode")
    print(f"{'mode':<10} {'tgt tok/s':>10} {'tok/step':>9} {'ms/step':>9} {'pad_fraction':>13}")
    for mode, row in r["train"].items():
        print(f"{mode:<10} {row['tok_s']:>10.0f} {row['tokens_per_step']:>9.0f} {row['step_ms_median']:>9.1f} "
              f"{row['pad_fraction']:>13.3f}")
    ev = r["eval"]
    print(f"eval       forward-only {ev['forward_tok_s']:.0f} tgt tok/s over {ev['rows']} rows "
          f"({r['eval_vs_train']:.2f}x training); trainer's evaluation {ev['metrics_tok_s']:.0f} tgt tok/s over "
          f"{ev['metrics_rows']} rows")
    print(f"real / synthetic = {r['real_vs_synthetic']:.2f} (target >= {r['target_ratio']}: "
          f"{'met' if r['meets_target'] else 'NOT met'})")
    return 0
