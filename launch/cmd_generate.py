"""`ndtrain generate`: translate (seq2seq) or continue (language model) text with a trained run.

    ndtrain generate --run runs/reverse 12345                 # -> 54321 (greedy)
    ndtrain generate --run runs/m30k --beam 4 --input de.txt  # one output line per input line
    echo "ROMEO:" | ndtrain generate --run runs/shakespeare --temperature 0.8 --top-k 40 --max-len 300 --seed 1

Without TEXT and --input, lines are read from stdin. Decoding goes through engine.decoding: greedy by default,
--beam K for beam search (batched over the input lines; length penalty --lenpen A / --lenpen-kind, default the
model's length_penalty / length_penalty_kind), --temperature / --top-k / --top-p for
sampling (seeded by --seed: the same seed gives the same text). A language model's output is the prompt followed by
its continuation; a newline inside it is written as the two characters \\n (so output lines match input lines)
unless --raw is given. --checkpoint avg uses `ndtrain average`'s checkpoint; BLAS threads are pinned (--threads).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ndtrain.launch.errors import UsageError
from ndtrain.launch.cmd_eval import add_decoding_args
from ndtrain.engine import decoding
from ndtrain.data.info import BOS, UNK
from ndtrain.launch.cmd_eval import apply_decoding_args
from ndtrain.launch.restore import load_run, pinned_threads

DEFAULT_LM_TOKENS = 200
SEQ2SEQ_CHUNK = 64  # sources decoded together (padded to the longest)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="translate or continue text with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (written by ndtrain train)")
    p.add_argument("text", nargs="*", help="input text (several words are joined by spaces); default: stdin")
    p.add_argument("--input", metavar="FILE", help="read input lines from FILE")
    p.add_argument("--beam", type=int, metavar="K", help="beam search with K beams")
    p.add_argument("--temperature", type=float, help="sample with this temperature (> 0)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: the smallest set with mass >= P")
    p.add_argument("--max-len", type=int, metavar="N",
                   help=f"tokens to generate (default: the task's max target length; lm {DEFAULT_LM_TOKENS})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--raw", action="store_true", help="write generated newlines as they are")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (for its tokenizer), if not the run's")
    add_decoding_args(p)
    p.set_defaults(func=main)


# -- options ------------------------------------------------------------------------------------------------------------
def decoding_options(args) -> dict:
    """{"mode": greedy|beam|sample, ...} from the flags; conflicting or out-of-range flags raise UsageError."""
    sampling = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.beam is not None and sampling:
        raise UsageError("--beam: choose beam search or sampling (--temperature/--top-k/--top-p), not both")
    if args.beam is not None:
        if args.beam < 1:
            raise UsageError(f"--beam: must be >= 1, got {args.beam}")
        return {"mode": "beam", "beam_size": args.beam}
    if not sampling:
        return {"mode": "greedy"}
    t = 1.0 if args.temperature is None else args.temperature
    if t <= 0:
        raise UsageError(f"--temperature: must be > 0 (omit the sampling flags for greedy decoding), got {t}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k: must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p: must be in (0, 1], got {args.top_p}")
    return {"mode": "sample", "temperature": t, "top_k": args.top_k, "top_p": args.top_p}


def read_inputs(args, stdin=None) -> list[str]:
    if args.text and args.input:
        raise UsageError("give TEXT or --input FILE, not both")
    if args.text:
        return [" ".join(args.text)]
    if args.input:
        try:
            with open(args.input, encoding="utf-8") as f:
                return f.read().splitlines()
        except OSError as e:
            raise UsageError(f"{args.input}: cannot read: {e.strerror}") from None
    return (stdin or sys.stdin).read().splitlines()


# -- generation ---------------------------------------------------------------------------------------------------------
def _pad(rows: list[np.ndarray]) -> np.ndarray:
    """Right-pad with PAD (0) to (B, longest), at least one column."""
    out = np.zeros((len(rows), max(1, max((len(r) for r in rows), default=1))), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def translate(run, lines: list[str], opts: dict, max_len: int | None = None, seed: int = 0) -> list[str]:
    """seq2seq: each line -> the decoded target text (sources longer than the task's max_src_len are cut)."""
    model, tok = run.model, run.tokenizer
    max_len = max_len or run.info.max_tgt_len or getattr(model, "max_decode_len", None) or 64
    max_src = run.info.max_src_len or None
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for lo in range(0, len(lines), SEQ2SEQ_CHUNK):
        src = _pad([tok.encode(s)[:max_src] for s in lines[lo:lo + SEQ2SEQ_CHUNK]])  # (B, S)
        if opts["mode"] == "beam":
            ids = decoding.beam_search(model.module, src, beam_size=opts["beam_size"], max_len=max_len,
                                       alpha=getattr(model, "length_penalty", 0.6),
                                       penalty=getattr(model, "length_penalty_kind", "gnmt"))[0]
        elif opts["mode"] == "sample":
            ids = decoding.sample(model.module, src, max_len=max_len, temperature=opts["temperature"],
                                  top_k=opts["top_k"], top_p=opts["top_p"], rng=rng)
        else:
            ids = decoding.greedy(model.module, src, max_len=max_len)
        out += [tok.decode(row) for row in ids]
    return out


def continue_text(run, lines: list[str], opts: dict, max_len: int | None = None, seed: int = 0) -> list[str]:
    """lm: each line is a prompt; returns prompt + continuation (max_len new tokens; a char LM never stops early)."""
    model, tok = run.model, run.tokenizer
    n_new = max_len or DEFAULT_LM_TOKENS
    window = getattr(model, "block_size", None) or run.info.max_tgt_len or None
    rng = np.random.default_rng(seed)
    out = []
    for line in lines:
        ids = tok.encode(line)
        if len(ids) == 0:  # an empty prompt starts from a newline (what a text LM saw between paragraphs)
            ids = tok.encode("\n")
            ids = ids if len(ids) and UNK not in ids else np.array([BOS], dtype=np.int32)
        prompt = np.asarray(ids, dtype=np.int32)[None, :]  # (1, P): prompts differ in length, one at a time
        if opts["mode"] == "beam":
            if window and prompt.shape[1] + n_new > window:  # beam search keeps a KV cache: no sliding window
                raise UsageError(f"--beam: prompt ({prompt.shape[1]} tokens) + --max-len {n_new} exceed the "
                                 f"model's context of {window} tokens; lower --max-len or sample instead")
            new = decoding.beam_search(model.module, None, beam_size=opts["beam_size"], max_len=n_new,
                                       prefix=prompt, eos=-1)[0]
        elif opts["mode"] == "sample":
            new = decoding.sample(model.module, None, max_len=n_new, temperature=opts["temperature"],
                                  top_k=opts["top_k"], top_p=opts["top_p"], rng=rng, prefix=prompt, eos=-1,
                                  window=window)
        else:
            new = decoding.greedy(model.module, None, max_len=n_new, prefix=prompt, eos=-1, window=window)
        out.append(line + tok.decode(new[0]))
    return out


def generate(run, lines: list[str], opts: dict, max_len: int | None = None, seed: int = 0) -> list[str]:
    if run.tokenizer is None:
        raise UsageError(f"{run.run_dir}: task {run.info.name!r} has no tokenizer (the run directory and its data "
                         f"directory hold none): cannot turn text into ids")
    if run.kind == "seq2seq":
        return translate(run, lines, opts, max_len, seed)
    if run.kind == "lm":
        return continue_text(run, lines, opts, max_len, seed)
    raise UsageError(f"{run.run_dir}: generate needs a seq2seq or lm model; task {run.info.name!r} is {run.kind}")


def main(args, stdin=None) -> int:
    opts = decoding_options(args)
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max-len: must be >= 1, got {args.max_len}")
    with pinned_threads(args.threads):
        run = load_run(args.run, data_dir=args.data, checkpoint=args.checkpoint)
        if run.kind not in ("seq2seq", "lm"):
            raise UsageError(f"{run.run_dir}: generate needs a seq2seq or lm model; task {run.info.name!r} is "
                             f"{run.kind}")
        apply_decoding_args(run.model, args, None)
        lines = read_inputs(args, stdin)
        for text in generate(run, lines, opts, args.max_len, args.seed):
            print(text if args.raw else text.replace("\n", "\\n"), flush=True)
    return 0


__all__ = ["generate", "translate", "continue_text", "decoding_options", "read_inputs", "add_parser", "main"]
