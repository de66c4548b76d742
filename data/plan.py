"""Which rows form global batch k of an epoch: a pure function of (seed, epoch) and the data, never of the ranks.

  order  = permutation of all N rows from default_rng([seed, epoch])  (or 0..N-1 without shuffle)
  batch k = order[bounds[k]:bounds[k + 1]]

Modes:
  fixed      bounds every B rows; drop_last drops a short final batch.
  bucketed   (seq2seq) the permuted rows are cut into chunks of B * bucket_batches rows, each chunk sorted by length
             (stable) and cut into batches of B, then the batch order is shuffled with default_rng([seed, epoch, 1]):
             similar lengths share a batch (little padding) while the epoch stays random.
  max_tokens like bucketed, but a batch takes rows (in groups of rows_multiple) while rows * longest <= max_tokens
             (and rows <= B): batches of short rows hold more rows. rows_multiple lets every rank of any W dividing
             it get a non-empty, equal share.
Rank r of W takes the contiguous part np.array_split(batch, W)[r] (see `rank_share`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    order: np.ndarray  # (N',) int64 row ids in serving order (N' <= N when drop_last drops a tail)
    bounds: np.ndarray  # (K + 1,) int64 batch boundaries into order

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def batch(self, k: int) -> np.ndarray:
        return self.order[self.bounds[k]:self.bounds[k + 1]]


def permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Contiguous part r of W: equal when W divides len(batch); otherwise the first len % W ranks get one more row
    (possibly empty shares for a tiny last eval batch). The W parts concatenated are exactly the batch."""
    n = len(batch)
    q, rem = divmod(n, world_size)
    lo = rank * q + min(rank, rem)
    return batch[lo: lo + q + (1 if rank < rem else 0)]


def fixed_plan(n: int, B: int, seed: int, epoch: int, *, shuffle: bool, drop_last: bool) -> Plan:
    order = permutation(n, seed, epoch, shuffle)
    k = n // B if drop_last else -(-n // B)
    bounds = np.minimum(np.arange(k + 1, dtype=np.int64) * B, n)
    return Plan(order[: bounds[-1]], bounds)


def _sorted_chunks(order: np.ndarray, lengths: np.ndarray, chunk: int) -> list[np.ndarray]:
    out = []
    for lo in range(0, len(order), chunk):
        c = order[lo: lo + chunk]
        out.append(c[np.argsort(lengths[c], kind="stable")])
    return out


def _shuffle_batches(chunks_bounds: list[tuple[np.ndarray, np.ndarray]], seed, epoch, shuffle) -> Plan:
    batches = [c[b[i]:b[i + 1]] for c, b in chunks_bounds for i in range(len(b) - 1)]
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    return Plan(order, bounds)


def bucketed_plan(lengths: np.ndarray, B: int, seed: int, epoch: int, *, shuffle: bool, drop_last: bool,
                  bucket_batches: int = 50) -> Plan:
    n = len(lengths)
    order = permutation(n, seed, epoch, shuffle)
    if drop_last:
        order = order[: (n // B) * B]  # the short tail is dropped before sorting, so every batch has B rows
    chunks = _sorted_chunks(order, lengths, B * bucket_batches)
    cb = [(c, np.minimum(np.arange(-(-len(c) // B) + 1, dtype=np.int64) * B, len(c))) for c in chunks]
    return _shuffle_batches(cb, seed, epoch, shuffle)


def token_budget_plan(lengths: np.ndarray, max_tokens: int, seed: int, epoch: int, *, shuffle: bool,
                      drop_last: bool, max_rows: int | None = None, rows_multiple: int = 1,
                      chunk_rows: int = 8192) -> Plan:
    n = len(lengths)
    m = max(1, rows_multiple)
    order = permutation(n, seed, epoch, shuffle)
    cb = []
    for c in _sorted_chunks(order, lengths, chunk_rows):
        lens = lengths[c]
        b, count, longest = [0], 0, 0
        for lo in range(0, len(c), m):
            group_max = int(lens[lo: lo + m].max())
            new_longest = max(longest, group_max)
            rows = count + min(m, len(c) - lo)
            fits = rows * new_longest <= max_tokens and (max_rows is None or rows <= max_rows)
            if count and not fits:
                b.append(lo)
                count, longest = 0, 0
                new_longest = group_max
            count += min(m, len(c) - lo)
            longest = new_longest
        b.append(len(c))
        cb.append((c, np.array(b, dtype=np.int64)))
    plan = _shuffle_batches(cb, seed, epoch, shuffle)
    sizes = np.diff(plan.bounds)
    if drop_last and np.any(sizes % m):
        # chunk tails can hold fewer than rows_multiple rows: drop those batches (keeping the shuffled order)
        batches = [plan.batch(i) for i in range(len(plan)) if sizes[i] % m == 0]
        bounds = np.concatenate([[0], np.cumsum([len(x) for x in batches])]).astype(np.int64)
        return Plan(np.concatenate(batches) if batches else np.zeros(0, np.int64), bounds)
    return plan
