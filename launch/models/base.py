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
    # Token models count the padding of the batches they train on (note_padding in loss), so the loop can log
    # pad_fraction: the share of computed positions that are PAD.
    reports_padding = False
    _pad_counts = None  # np.array([pad positions, positions]) since the last pad_stats()

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

    # -- padding statistics ------------------------------------------------------------------------------------------
    def note_padding(self, *ids: np.ndarray, pad: int = 0) -> None:
        """Count the PAD positions among the token arrays a training step computes on (src and tgt_in, or x)."""
        if self._pad_counts is None:
            self._pad_counts = np.zeros(2, dtype=np.float64)
        for a in ids:
            self._pad_counts += (np.count_nonzero(a == pad), a.size)

    def pad_stats(self, comm=None) -> dict[str, float]:
        """{"pad_fraction": PAD positions / computed positions} over the training batches since the last call,
        summed over all ranks when comm is given (an all-reduce of two numbers: every rank must call it at the same
        steps, as the loop's log steps are); {} for models without padding. Resets the counts."""
        if not self.reports_padding:
            return {}
        counts = self._pad_counts.copy() if self._pad_counts is not None else np.zeros(2, dtype=np.float64)
        self._pad_counts = None
        if comm is not None and comm.world_size > 1:
            comm.allreduce(counts)
        return {"pad_fraction": float(counts[0] / counts[1])} if counts[1] else {}
