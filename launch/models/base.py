"""How a model meets the training loop: `TaskModel` binds an engine Module to a task kind.

The worker loop (cluster/worker.py) knows only this interface, so the MLP, the Transformers and the RNNs train
through the same code on every backend.

Batches are dicts of NumPy arrays (made by ndtrain.data):
  vector tasks   x: (B, D) float32, y: (B,) int64 class labels, or (B, K) float32 regression targets
  seq2seq        src: (B, S) int32, tgt_in: (B, T) int32 (BOS first), tgt_out: (B, T) int32 (EOS last); PAD = 0
  language model x: (B, T) int32, y: (B, T) int32 (x shifted by one); PAD = 0 where a row is short
PAD positions of a target are ignored by the loss and by every metric.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from ndtrain.engine.module import Module


class TaskModel(ABC):
    module: Module

    @abstractmethod
    def loss(self, batch: dict[str, np.ndarray], *, train: bool) -> tuple[float, int, Callable[[float], None]]:
        """Forward one batch. Returns (loss_sum, count, backward):
        loss_sum  sum of the per-example (or per-real-token) losses of this batch, a Python float;
        count     how many examples (or real target tokens) loss_sum sums over;
        backward  backward(scale) accumulates the gradient of scale * loss_sum into the ParamStore's grads.
        The worker calls backward(1 / global_count), global_count summed over all ranks' shares of the global
        batch, so N workers compute exactly what one worker computes on the whole batch."""

    @abstractmethod
    def metric_sums(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Eval-mode statistics of one batch as *sums* (e.g. {"loss_sum": .., "count": .., "correct": ..}), so
        ranks' shares add up exactly."""

    @abstractmethod
    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed statistics into the task's metrics, e.g. {"loss": .., "accuracy": ..} or {"mse": ..}."""

    def set_tokenizer(self, tokenizer, bleu: bool | None = None) -> None:
        """The task's tokenizer (data.tokenizer.Tokenizer or None), for metrics on text (BLEU); bleu None: the
        model's own rule. Models without text metrics ignore it."""
