"""Attention heat map of a trained seq2seq Transformer for one validation example.

The engine's MultiHeadAttention records its weights when the forward pass is given a `record` dict
(engine/attention.py: record[module path] = weights (B, H, Tq, Tk)). We decode the first validation source
greedily, then run one teacher-forced forward over BOS + the model's own output, so the map shows which source
tokens each *generated* token looked at (the alignment the seed tutorials draw), for the last decoder layer's
cross-attention.

    png, caption = attention_map(run)    # run: launch.restore.Restored; (None, why) when there is no map
"""
from __future__ import annotations

import inspect

import numpy as np

from ndtrain.data.info import BOS, EOS, PAD

from .plots import attention_png
from ndtrain.launch.restore import split_dataset


def _token_labels(tokenizer, ids) -> list[str]:
    """One readable label per id (specials by name, a space as '␣')."""
    names = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}
    out = []
    for i in np.asarray(ids).tolist():
        if i in names:
            out.append(names[i])
            continue
        piece = None
        tokens = getattr(tokenizer, "tokens", None)
        if tokens is not None and i < len(tokens):
            piece = tokens[i]
        elif hasattr(tokenizer, "hf"):
            piece = tokenizer.hf.id_to_token(i)
        out.append(("␣" if piece == " " else piece) if piece is not None else str(i))
    return out


def _cross_attention_keys(record: dict) -> list[str]:
    return sorted((k for k in record if k.startswith("decoder.") and k.endswith("cross_attn")),
                  key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])


def attention_map(run, example: int = 0) -> tuple[bytes | None, str]:
    """(PNG bytes, caption), or (None, the reason there is no map)."""
    if run.kind != "seq2seq":
        return None, f"no attention map: task {run.info.name!r} is {run.kind} (maps are drawn for seq2seq models)"
    module = run.model.module
    if "record" not in inspect.signature(module.forward).parameters:
        return None, (f"no attention map: model {run.cfg.run.model!r} ({type(module).__name__}) does not expose "
                      f"attention weights (only the Transformer records them)")
    val = split_dataset(run.cfg, "val")
    if val.n_rows() <= example:
        return None, "no attention map: the validation split is empty"
    batch = val.batch(np.array([example]))
    src = np.asarray(batch["src"], dtype=np.int32)  # (1, S)
    src = src[:, : max(1, int(np.count_nonzero(src[0] != PAD)))]  # no PAD columns in the picture
    max_len = run.info.max_tgt_len or batch["tgt_out"].shape[1]
    pred = run.model.decode(src, max_len=max_len)  # (1, L) ending in EOS (then PAD) unless cut at max_len
    row = pred[0]
    ends = np.flatnonzero(row == EOS)
    row = row[: ends[0] + 1] if ends.size else row[row != PAD]
    tgt_in = np.concatenate([[BOS], row[:-1]]).astype(np.int32)[None, :] if len(row) else \
        np.array([[BOS]], dtype=np.int32)
    record: dict = {}
    module(src, tgt_in, record=record, train=False)
    keys = _cross_attention_keys(record)
    if not keys:
        return None, "no attention map: the forward pass recorded no cross-attention weights"
    weights = np.asarray(record[keys[-1]])[0]  # (H, T_out, S)
    src_labels = _token_labels(run.tokenizer, src[0]) if run.tokenizer is not None else [str(i) for i in src[0]]
    out_ids = row if len(row) else np.array([EOS])
    out_labels = _token_labels(run.tokenizer, out_ids) if run.tokenizer is not None else [str(i) for i in out_ids]
    weights = weights[:, : len(out_labels)]
    src_text = run.tokenizer.decode(src[0]) if run.tokenizer is not None else " ".join(src_labels)
    out_text = run.tokenizer.decode(row) if run.tokenizer is not None else " ".join(out_labels)
    title = f"{keys[-1]} (step {run.step})"
    caption = (f"Cross-attention of the last decoder layer ({keys[-1]}), every head, for validation example "
               f"{example}: source {src_text!r} -> model output {out_text!r}. Rows: generated tokens; columns: "
               f"source tokens.")
    return attention_png(weights, src_labels, out_labels, title), caption


__all__ = ["attention_map"]
