"""Deterministic mode: gradients bitwise identical for any worker count W at the same global batch.

Floating-point addition is not associative, so "the same sum" must mean the same additions in the same order.
The default mode sums each rank's share in one backward and then lets the communicator add the W partial sums in
whatever order its algorithm picks: results depend on W. Here:

1. Fixed micro-batches. Global batch k (B rows) is cut into M micro-batches of B/M rows (M a power of two, fixed by
   the config, never by W). Rank r of W owns micro-batches [r*M/W, (r+1)*M/W): a contiguous block, exactly its
   loader share. Each micro-batch is padded and built from its own rows only (never from the rank's share), so its
   arrays — hence its BLAS calls, with 1 thread — are the same whatever W is.
2. One gradient per micro-batch (backward(1.0): the gradient of its loss SUM), leaves of a fixed balanced binary
   tree over micro-batch index 0..M-1:

              g0..7                     level 3  (combined after the exchange, identically on every rank)
          g0..3      g4..7              level 2  (W=2: rank 0 holds g0..3, rank 1 g4..7)
        g01   g23   g45   g67           level 1
       g0 g1 g2 g3 g4 g5 g6 g7          level 0  (micro-batches)

   A rank reduces its block locally — a complete subtree, since M/W is a power of two and the block is aligned —
   with `TreeSum` (a binary counter: O(log M) partial sums alive, never all M gradients). Then the W subtree roots
   are exchanged (`allgather_rows`: every rank gets all W, bitwise) and combined by `tree_sum` in the same order.
   For W = 1, 2, 4 every addition is the same: the same bits.
3. The 1/global_count scale is applied once, at the end, by every rank alike.

Zeros: -0.0 + +0.0 is +0.0, so an exchange that pads with zeros could flip the sign of a zero the W=1 run keeps.
Partial sums are canonicalised (`x += 0.0` turns -0.0 into +0.0 and changes nothing else) before the exchange, on
every W, so no -0.0 reaches the tree's upper levels.

Cost: no overlap of communication with backward, M/W backward calls per rank instead of one (smaller GEMMs), and an
exchange of W*n numbers instead of an all-reduce of n. Measured in the README / report of issue 7.
"""
from __future__ import annotations

import math

import numpy as np

from ndtrain.data.loader import Loader
from ndtrain.engine.module import seed_rngs


def is_power_of_two(n: int) -> bool:
    return n >= 1 and not (n & (n - 1))


def block_of(rank: int, world_size: int, micro_batches: int) -> range:
    """The micro-batch indices rank r owns: a contiguous, aligned block of M/W."""
    if micro_batches % world_size:
        raise ValueError(f"{micro_batches} micro-batches do not split evenly over {world_size} ranks")
    per = micro_batches // world_size
    return range(rank * per, (rank + 1) * per)


def split_rows(rows: np.ndarray, parts: int) -> list[np.ndarray]:
    """`rows` cut into `parts` equal contiguous pieces (len(rows) must be a multiple of parts)."""
    if len(rows) % parts:
        raise ValueError(f"{len(rows)} rows do not split into {parts} equal micro-batches")
    n = len(rows) // parts
    return [rows[i * n:(i + 1) * n] for i in range(parts)]


class TreeSum:
    """Sum leaves pushed in order along a balanced binary tree (a binary counter of partial sums).

    For 2^j leaves the result is the root of the complete tree: ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). Each addition
    is `left + right` with left the lower indices. Pushed arrays are copied (the caller may reuse its buffer)."""

    def __init__(self):
        self._stack: list[tuple[int, np.ndarray]] = []  # (level, partial sum), levels strictly decreasing
        self.count = 0

    def push(self, leaf: np.ndarray) -> None:
        level, acc = 0, np.array(leaf, copy=True)
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            left += acc  # left + right, in place into the left operand (same bits as a fresh left + acc)
            acc, level = left, level + 1
        self._stack.append((level, acc))
        self.count += 1

    def result(self) -> np.ndarray:
        """The root. Only for a power-of-two number of leaves (otherwise the tree would not be the fixed one)."""
        if not is_power_of_two(self.count) or len(self._stack) != 1:
            raise ValueError(f"TreeSum: {self.count} leaves; a fixed balanced tree needs a power of two")
        return self._stack[0][1]


def tree_sum(leaves) -> np.ndarray:
    """The balanced pairwise sum of a power-of-two list of arrays (or floats), leaf order fixed."""
    t = TreeSum()
    for leaf in leaves:
        t.push(np.asarray(leaf))
    return t.result()


def canonical_zeros(x: np.ndarray) -> np.ndarray:
    """In place: -0.0 -> +0.0 (x + 0.0 is x for every other value, NaN and Inf included)."""
    x += x.dtype.type(0)
    return x


def allgather_rows(comm, mine: np.ndarray) -> np.ndarray:
    """(W, n) array of every rank's `mine` (n,), identical bits on every rank, through comm.allreduce only: each
    rank writes its row into zeros and the rows are summed. Exact, because every column holds one value and W-1
    zeros (x + 0 = x; `mine` must not hold -0.0: see canonical_zeros)."""
    W = comm.world_size
    if W == 1:
        return mine.reshape(1, -1).copy()
    out = np.zeros((W, mine.size), dtype=mine.dtype)
    out[comm.rank] = mine.ravel()
    comm.allreduce(out)
    return out


def global_tree_sum(comm, local_root: np.ndarray) -> np.ndarray:
    """The W ranks' subtree roots combined along the top of the tree (same result, same bits, on every rank)."""
    if not is_power_of_two(comm.world_size):
        raise ValueError(f"deterministic mode needs a power-of-two world size, got {comm.world_size}")
    rows = allgather_rows(comm, canonical_zeros(local_root))
    return tree_sum(list(rows)).reshape(local_root.shape)


class MicroBatchLoader(Loader):
    """The Loader whose items are this rank's micro-batches of global batch k: a list of M/W batch dicts, each
    built from its own rows (padding, block cutting) exactly as with any other world size. Same state_dict
    ({"epoch", "batches_done"}), same global order."""

    def __init__(self, dataset, global_batch_size: int, rank: int, world_size: int, seed: int, micro_batches: int,
                 **kw):
        super().__init__(dataset, global_batch_size, rank, world_size, seed, **kw)
        if not is_power_of_two(micro_batches):
            raise ValueError(f"micro_batches must be a power of two, got {micro_batches}")
        self.micro_batches = micro_batches
        self.block = block_of(rank, world_size, micro_batches)

    def micro_rows(self, epoch: int, k: int) -> list[np.ndarray]:
        """Row ids of this rank's micro-batches of global batch k, in micro-batch order."""
        parts = split_rows(self.global_batch_rows(epoch, k), self.micro_batches)
        return [parts[i] for i in self.block]

    def make_batch(self, epoch: int, k: int) -> list[dict[str, np.ndarray]]:
        return [self.dataset.batch(rows, **self.batch_kwargs) for rows in self.micro_rows(epoch, k)]


def deterministic_gradient(model, store, comm, micro: list, block: range, seed: int, step: int,
                           buf: np.ndarray, vote: float = 0.0) -> bool:
    """store.grad = gradient of the global mean loss, bitwise independent of W; buf = [global loss sum, global
    count, stop votes] (this rank's `vote` rides in the exchange: cluster/interrupt.py). `micro` is this rank's block (`block`: micro-batch indices) of the fixed micro-batches; dropout is seeded
    per (seed, step, micro-batch index), not per rank. False (no gradient, on every rank alike) when the global loss
    is not finite. The caller checks buf[1] > 0."""
    module = model.module
    backwards, sums = [], np.zeros((2, len(block)), dtype=np.float64)
    for j, (i, mb) in enumerate(zip(block, micro)):
        seed_rngs(module, int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]))
        loss_sum, count, backward = model.loss(mb, train=True)
        sums[:, j] = loss_sum, count
        backwards.append(backward)
    rows = allgather_rows(comm, canonical_zeros(np.append(sums.ravel(), vote)))  # (W, 2 * M/W + 1)
    buf[2] = rows[:, -1].sum()  # stop votes
    per_rank = rows[:, :-1].reshape(comm.world_size, 2, len(block))  # rank order = micro-batch order
    buf[0] = float(tree_sum(list(per_rank[:, 0, :].ravel())))
    buf[1] = float(per_rank[:, 1, :].sum())  # integers: exact in any order
    if buf[1] <= 0 or not math.isfinite(buf[0]):
        return False
    tree = TreeSum()
    for backward in backwards:
        store.zero_grad()
        backward(1.0)  # the gradient of this micro-batch's loss SUM
        tree.push(store.grad)
    backwards.clear()
    store.grad[...] = global_tree_sum(comm, tree.result())
    store.grad *= store.grad.dtype.type(1.0 / buf[1])  # the mean: scaled once, identically
    return True
