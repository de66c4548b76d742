"""What a rank trains: the job `launch` builds from a validated config and `cluster.trainer` runs.

As PyTorch DDP wraps a module the user already built, and Ray Train runs a function it was handed, the cluster layer
never reads a config, never builds a model and never opens a dataset: everything arrives here, ready.

    job = TrainJob(model, store, optimizer, lr_at, loader, eval_batches, settings, fingerprints, meta)
    summary = Trainer(job, comm, sink).run()

TaskModel is the one interface between a model family and the loop (the MLP, the Transformers and the RNNs train
through the same code on every backend). Batches are dicts of NumPy arrays (made by ndtrain.data):
  vector tasks   x: (B, D) float32, y: (B,) int64 class labels, or (B, K) float32 regression targets
  seq2seq        src: (B, S) int32, tgt_in: (B, T) int32 (BOS first), tgt_out: (B, T) int32 (EOS last); PAD = 0
  language model x: (B, T) int32, y: (B, T) int32 (x shifted by one); PAD = 0 where a row is short
PAD positions of a target are ignored by the loss and by every metric.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ndtrain.engine.module import Module
from ndtrain.engine.params import ParamStore


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
        The trainer calls backward(1 / global_count), global_count summed over all ranks' shares of the global
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


@dataclass
class LoopSettings:
    """The loop's numbers (launch fills them in from run.*, optim.grad_clip and cluster.*)."""
    steps: int  # optimizer steps in all (a resumed job continues up to it)
    checkpoint_dir: Path  # where save_checkpoint writes
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # non-finite steps in a row after which the job stops
    grad_clip: float = 0.0  # max global gradient norm (0: no clipping)
    seed: int = 0  # deterministic mode seeds dropout per (seed, step, micro-batch)
    deterministic: bool = False  # cluster/deterministic.py: bitwise equal for any W
    bucket_mb: float = 1.0  # GradReducer bucket size
    overlap: bool = True  # all-reduce buckets while backward runs
    compress: str = ""  # "" | fp16 | bf16 | powersgd: the reducer's compressed exchange (cluster/compressed.py)
    powersgd_rank: int = 2
    sync_every: int = 0  # DiLoCo's H (cluster/local_sgd.py); 0: synchronous training
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    sync_overlap: bool = False  # DiLoCo: the outer exchange in the background, applied sync_delay steps later
    sync_delay: int = 0  # DiLoCo overlapped: inner steps between an exchange's launch and its outer step (0: H)
    link_probe_mb: float = 4.0  # the start-up link probe's all-reduce (cluster/link_probe.py); 0: none


@dataclass
class TrainJob:
    """Everything one rank needs. Built per rank (launch.job.build_job); all ranks' jobs agree on `fingerprints`
    (checked at start: the error names the first rank that differs)."""
    model: TaskModel  # the model adapter; model.module is the engine Module
    store: ParamStore  # its parameters and gradients as two flat buffers
    optimizer: Any  # engine.optim: step(lr) updates store.data in place
    lr_at: Callable[[int], float]  # the schedule: a pure function of the step
    loader: Any  # this rank's share of every global batch: iter() endless, state_dict() / load_state_dict()
    eval_batches: Callable[[], Iterable[dict]]  # a fresh pass over this rank's share of the validation rows
    settings: LoopSettings
    fingerprints: dict = field(default_factory=dict)  # {"config": hash, "data": [...]}: compared across ranks
    meta: dict = field(default_factory=dict)  # what every checkpoint records beside the loop's own state
    summary: dict = field(default_factory=dict)  # what summary.json records beside the loop's figures
    start_step: int = 0  # steps already done (a resumed job)
    skipped_steps: int = 0  # non-finite steps skipped before start_step
    resumed_from: Path | None = None  # the checkpoint JSON the job was restored from
    wall_before: float = 0.0  # wall seconds of the run before this process (a resumed run continues its clock)
    world_size: int = 1  # the world this job was built for
    rank_state: dict = field(default_factory=dict)  # this rank's own arrays from the checkpoint (same world only)
    rank_state_world: int = 0  # the world size the resumed checkpoint was written with (0: not resumed)
    shared_state: dict = field(default_factory=dict)  # the loop's shared arrays from the checkpoint (DiLoCo)
    # reshard(rank, world): replace loader and eval_batches with rank's share for a world of that size (an elastic
    # run's new group: cluster/elastic_rank.py); launch provides it
    reshard: Callable[[int, int], None] | None = None
