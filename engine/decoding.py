"""Decoding (greedy, beam search, sampling) written once against the IncrementalDecoder protocol, so the
Transformer models and the RNN seq2seq models share it.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class IncrementalDecoder(Protocol):
    """What a model offers to the decoding algorithms. `state` is opaque to them (a KV cache, RNN hidden states).

    start(src)            src: (B, S) int32 source ids (PAD = 0) for seq2seq, or None for a language model with
                          `batch_size` rows; encodes once and returns the initial state.
    step(tokens, state)   tokens: (B, t) int32, the new tokens (t = 1 while decoding; a prompt may be longer).
                          Returns (logits (B, V) of the last new position, new state). With a KV cache the logits
                          equal those of a full recompute over all tokens so far.
    reorder(state, idx)   idx: (B',) int64 rows to keep/repeat (beam search); returns the selected state.
    """

    def start(self, src: np.ndarray | None, batch_size: int | None = None) -> Any: ...

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...

    def reorder(self, state: Any, idx: np.ndarray) -> Any: ...
