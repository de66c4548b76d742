"""Text samples for the report, made at report time from the run's checkpoint with the engine's greedy decoding.

    samples = text_samples(run)   # run: launch.restore.Restored
    # seq2seq: [{"source", "reference", "output"}] for the first validation rows
    # lm:      [{"prompt", "output"}]: the start of the first validation block, continued greedily
    # other kinds: []

Greedy decoding is deterministic and cheap for the few rows shown (a char LM's 200 new tokens, a handful of
translations); BLAS is pinned to one thread while it runs, so a report never competes with the ranks of another job
for cores.
"""
from __future__ import annotations

import numpy as np

from ndtrain.data.info import EOS, PAD
from ndtrain.engine import decoding
from ndtrain.launch.restore import split_dataset
from threadpoolctl import threadpool_limits

N_TRANSLATIONS = 5
LM_PROMPT_TOKENS = 32
LM_NEW_TOKENS = 200


def _text(tokenizer, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if EOS in ids:
        ids = ids[: ids.index(EOS)]
    ids = [i for i in ids if i != PAD]
    return tokenizer.decode(np.asarray(ids, dtype=np.int32)) if tokenizer is not None else " ".join(map(str, ids))


def _translations(run, n: int) -> list[dict]:
    val = split_dataset(run.cfg, "val")
    k = min(n, val.n_rows())
    if k == 0:
        return []
    batch = val.batch(np.arange(k))
    src = np.asarray(batch["src"], dtype=np.int32)  # (k, S)
    max_len = run.info.max_tgt_len or batch["tgt_out"].shape[1]
    out = decoding.greedy(run.model.module, src, max_len=max_len)  # (k, L)
    return [{"source": _text(run.tokenizer, src[i]), "reference": _text(run.tokenizer, batch["tgt_out"][i]),
             "output": _text(run.tokenizer, out[i])} for i in range(k)]


def _continuation(run) -> list[dict]:
    val = split_dataset(run.cfg, "val")
    if val.n_rows() == 0:
        return []
    x = np.asarray(val.batch(np.array([0]))["x"], dtype=np.int32)[0]  # (T,) the first validation block
    prompt = x[:LM_PROMPT_TOKENS][None, :]  # (1, P)
    window = getattr(run.model, "block_size", None) or run.info.max_tgt_len or None
    new = decoding.greedy(run.model.module, None, max_len=LM_NEW_TOKENS, prefix=prompt, eos=-1, window=window)
    return [{"prompt": _text(run.tokenizer, prompt[0]), "output": _text(run.tokenizer, new[0])}]


def text_samples(run, n: int = N_TRANSLATIONS) -> list[dict]:
    """See the module docstring. Raises what decoding raises; the report turns that into a note."""
    with threadpool_limits(limits=1):
        if run.kind == "seq2seq":
            return _translations(run, n)
        if run.kind == "lm":
            return _continuation(run)
    return []


__all__ = ["text_samples"]
