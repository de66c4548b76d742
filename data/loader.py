"""The deterministic loader: rank r of W gets its part of global batch k of epoch e.

    loader = Loader(dataset, global_batch_size=64, rank=r, world_size=W, seed=0)
    for step, batch in zip(range(n_steps), loader): ...      # endless: epochs follow one another
    state = loader.state_dict()                              # {"epoch": e, "batches_done": k}
    Loader(..., world_size=W2).load_state_dict(state)        # same remaining global batches, any W2

Global batch k of epoch e is fixed by (seed, e) and the data (plan.py), never by W; rank r takes the contiguous part
`plan.rank_share(batch, r, W)` (rows [r*B/W, (r+1)*B/W) when W divides B). So the union of the ranks' parts is
exactly batch k, every rank gets the same number of batches, and no row repeats within an epoch.

The state counts batches *handed to the caller* (not those prefetched), so a checkpoint taken after a step resumes
with the next batch. Eval: `Loader.for_eval(...)` serves every row exactly once per pass (no shuffle, no drop_last,
the last batch may be short; a rank's share may then be smaller, even empty — its counts are exact, not padded).
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from . import plan as plans
from .dataset import Dataset, as_dataset


class Loader:
    def __init__(self, dataset, global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool | None = None, *, endless: bool = True,
                 block_size: int | None = None, bucket: bool = False, bucket_batches: int = 50,
                 max_tokens: int | None = None, rows_multiple: int = 1, max_src_len: int | None = None,
                 max_tgt_len: int | None = None, masks: bool = False, prefetch: int = 0):
        """dataset: a Dataset or the (TaskInfo, columns) of tasks.generate. drop_last defaults to shuffle.
        block_size: lm context length T (default info.max_tgt_len). bucket: length-bucketed seq2seq batches.
        max_tokens: token-budget batches (rows * longest <= max_tokens, at most global_batch_size rows, in groups
        of rows_multiple). max_src_len / max_tgt_len: cut seq2seq rows to the model's capacity. masks: add
        src_pad_mask / tgt_pad_mask. prefetch: batches prepared ahead by a background thread (0 = none)."""
        self.dataset: Dataset = as_dataset(dataset)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if (bucket or max_tokens) and self.dataset.kind != "seq2seq":
            raise ValueError(f"{self.dataset.source}: bucketing / max_tokens apply to seq2seq data, not "
                             f"{self.dataset.kind}")
        self.global_batch_size, self.rank, self.world_size = int(global_batch_size), rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.drop_last = shuffle if drop_last is None else drop_last
        self.endless = endless
        self.block_size = block_size
        self.bucket, self.bucket_batches = bucket, bucket_batches
        self.max_tokens, self.rows_multiple = max_tokens, rows_multiple
        self.batch_kwargs = dict(block_size=block_size, max_src_len=max_src_len, max_tgt_len=max_tgt_len, masks=masks)
        self.prefetch = prefetch
        self.n_rows = self.dataset.n_rows(block_size)
        self._lengths = None
        self._plan_cache: dict[int, plans.Plan] = {}  # the last two epochs (the prefetch thread may run ahead)
        self.epoch, self.batches_done = 0, 0
        if self.epoch_batches == 0:
            raise ValueError(f"{self.dataset.source}: {self.n_rows} rows give no batch of {global_batch_size} "
                             f"(drop_last={self.drop_last})")

    @classmethod
    def for_eval(cls, dataset, global_batch_size: int, rank: int = 0, world_size: int = 1, **kw) -> "Loader":
        """One pass over every row, in order, per iteration."""
        return cls(dataset, global_batch_size, rank, world_size, shuffle=False, drop_last=False, endless=False, **kw)

    # --- the plan ------------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> plans.Plan:
        cached = self._plan_cache.get(epoch)
        if cached is not None:
            return cached
        B = self.global_batch_size
        if self.bucket or self.max_tokens:
            if self._lengths is None:
                self._lengths = self.dataset.lengths()
            if self.max_tokens:
                p = plans.token_budget_plan(self._lengths, self.max_tokens, self.seed, epoch, shuffle=self.shuffle,
                                            drop_last=self.drop_last, max_rows=B, rows_multiple=self.rows_multiple)
            else:
                p = plans.bucketed_plan(self._lengths, B, self.seed, epoch, shuffle=self.shuffle,
                                        drop_last=self.drop_last, bucket_batches=self.bucket_batches)
        else:
            p = plans.fixed_plan(self.n_rows, B, self.seed, epoch, shuffle=self.shuffle, drop_last=self.drop_last)
        self._plan_cache = {e: q for e, q in self._plan_cache.items() if e == epoch - 1} | {epoch: p}
        return p

    @property
    def epoch_batches(self) -> int:
        """Global batches (= steps of every rank) in the current epoch."""
        return len(self.plan(self.epoch))

    def global_batch_rows(self, epoch: int, k: int) -> np.ndarray:
        return self.plan(epoch).batch(k)

    def rank_rows(self, epoch: int, k: int) -> np.ndarray:
        """Row ids of this rank's part of global batch k."""
        return plans.rank_share(self.plan(epoch).batch(k), self.rank, self.world_size)

    def make_batch(self, epoch: int, k: int) -> dict[str, np.ndarray]:
        return self.dataset.batch(self.rank_rows(epoch, k), **self.batch_kwargs)

    # --- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "batches_done": int(self.batches_done)}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if not (0 <= done <= len(self.plan(epoch))):
            raise ValueError(f"loader state batches_done={done} is outside epoch {epoch}'s "
                             f"{len(self.plan(epoch))} batches (different data or batch size?)")
        self.epoch, self.batches_done = epoch, done

    # --- iteration -------------------------------------------------------------------------------------------------
    def _positions(self):
        """(epoch, k) of the batches to serve from the current state on."""
        epoch, k = self.epoch, self.batches_done
        while True:
            n = len(self.plan(epoch))
            while k < n:
                yield epoch, k
                k += 1
            if not self.endless:
                return
            epoch, k = epoch + 1, 0

    def __iter__(self):
        if self.batches_done >= len(self.plan(self.epoch)):  # a finished pass: the next one starts
            self.epoch, self.batches_done = self.epoch + 1, 0
        produce = ((e, k, self.make_batch(e, k)) for e, k in self._positions())
        source = _prefetched(produce, self.prefetch) if self.prefetch > 0 else produce
        try:
            for e, k, batch in source:
                # state = "after this batch": what a checkpoint taken after the step must hold
                self.epoch, self.batches_done = e, k + 1
                yield batch
        finally:
            close = getattr(source, "close", None)
            if close:
                close()

    def __len__(self) -> int:
        return self.epoch_batches


_END = object()


def _prefetched(items, depth: int):
    """Run the generator `items` in a daemon thread, `depth` items ahead; exceptions re-raise in the caller.
    Closing the returned generator stops the thread (NumPy gathers release the GIL, so loading overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for x in items:
                if not put(x):
                    return
            put(_END)
        except BaseException as e:  # forwarded to the consumer, never swallowed
            put(e)

    t = threading.Thread(target=work, name="ndtrain-loader-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)
