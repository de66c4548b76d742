"""Deterministic mode: gradients bitwise identical for any worker count W at the same global batch.

Floating-point addition is not associative, so "the same sum" must mean the same additions in the same order.
The default mode sums each rank's share in one backward and then lets the communicator add the W partial sums in
whatever order its algorithm picks: results depend on W. Here:

1. Fixed micro-batches. Global batch k (B rows) is cut into M micro-batches of B/M rows (M a power of two, fixed by
   the config, never by W). Rank r of W owns micro-batches [r*M/W, (r+1)*M/W) (W <= M; when W does not divide M the
   first M % W ranks own one more, as data.plan.rank_share splits rows): a contiguous block, exactly its
   loader share. Each micro-batch is padded and built from its own rows only (never from the rank's share), so its
   arrays — hence its BLAS calls, with 1 thread — are the same whatever W is.
2. One gradient per micro-batch (backward(1.0): the gradient of its loss SUM), leaves of a fixed balanced binary
   tree over micro-batch index 0..M-1:

              g0..7                     level 3  (combined after the exchange, identically on every rank)
          g0..3      g4..7              level 2  (W=2: rank 0 holds g0..3, rank 1 g4..7)
        g01   g23   g45   g67           level 1
       g0 g1 g2 g3 g4 g5 g6 g7          level 0  (micro-batches)

   A rank reduces its block locally — a complete subtree when W divides M (M/W is a power of two and the block is
   aligned), else a few aligned subtrees (`dyadic_nodes`: W = 3, M = 8 gives rank 1 the nodes g23 and g4) —
   with `TreeSum` (a binary counter: O(log M) partial sums alive, never all M gradients). Then the W subtree roots
   are exchanged (`allgather_rows`: every rank gets all of them, bitwise) and the levels above them are added
   pairwise as one rank would. For any W <= M every addition is the same: the same bits (so an elastic run that
   changes W mid-run stays bitwise equal to an undisturbed one: docs/elastic.md).
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
    """The micro-batch indices rank r owns: a contiguous block, M/W of them when W divides M, else the first M % W
    ranks one more (the rule of data.plan.rank_share, so the block is exactly the rank's loader share)."""
    if not 1 <= world_size <= micro_batches:
        raise ValueError(f"{micro_batches} micro-batches cannot feed {world_size} ranks (one at least each)")
    q, rem = divmod(micro_batches, world_size)
    lo = rank * q + min(rank, rem)
    return range(lo, lo + q + (1 if rank < rem else 0))


def dyadic_nodes(block: range) -> list[tuple[int, int]]:
    """The block as maximal aligned power-of-two runs, left to right: (level, index) nodes of the fixed tree
    (node (l, i) covers leaves [i 2^l, (i+1) 2^l)). An aligned block of 2^j leaves is one node."""
    out, i = [], block.start
    while i < block.stop:
        level = 0
        while i % (2 << level) == 0 and i + (2 << level) <= block.stop:
            level += 1
        out.append((level, i >> level))
        i += 1 << level
    return out


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


def global_tree_sum(comm, local_roots: list[np.ndarray], micro_batches: int) -> np.ndarray:
    """The whole tree's root from every rank's subtree roots (this rank's: `local_roots`, the nodes of
    dyadic_nodes(block_of(rank, W, M)) in order), the same bits on every rank and for every W <= M: the nodes are
    exchanged (allgather_rows) and the levels above them added pairwise, left + right, as one rank would."""
    W = comm.world_size
    layout = [n for r in range(W) for n in dyadic_nodes(block_of(r, W, micro_batches))]
    mine = dyadic_nodes(block_of(comm.rank, W, micro_batches))
    shape = local_roots[0].shape
    first = layout.index(mine[0])
    flat = np.zeros((len(layout), local_roots[0].size), dtype=local_roots[0].dtype)
    for j, root in enumerate(local_roots):
        flat[first + j] = canonical_zeros(root).ravel()
    if W > 1:
        comm.allreduce(flat)  # one value and zeros per column: exact
    known = {node: flat[j] for j, node in enumerate(layout)}

    def node(level: int, i: int) -> np.ndarray:
        if (level, i) not in known:
            known[(level, i)] = node(level - 1, 2 * i) + node(level - 1, 2 * i + 1)
        return known[(level, i)]

    return canonical_zeros(node(int(math.log2(micro_batches)), 0).copy()).reshape(shape)


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
                           buf: np.ndarray, vote: float = 0.0, micro_batches: int = 0) -> bool:
    """store.grad = gradient of the global mean loss, bitwise independent of W; buf = [global loss sum, global
    count, stop votes, membership votes] (this rank's `vote` (stop) and buf[3] on entry (a membership change this
    rank knows of: cluster/elastic_rank.py) ride in the exchange: cluster/interrupt.py). `micro` is this rank's
    block (`block`: micro-batch indices) of the M = micro_batches fixed micro-batches; dropout is seeded per (seed,
    step, micro-batch index), not per rank. False (no gradient, on every rank alike) when the global loss is not
    finite. The caller checks buf[1] > 0."""
    module = model.module
    M = micro_batches or len(block) * comm.world_size
    backwards = []
    row = np.zeros(2 * M + 2, dtype=np.float64)  # [loss sums (M), counts (M), stop vote, membership vote]
    for i, mb in zip(block, micro):
        seed_rngs(module, int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]))
        loss_sum, count, backward = model.loss(mb, train=True)
        row[i], row[M + i] = loss_sum, count
        backwards.append(backward)
    row[-2], row[-1] = vote, (buf[3] if len(buf) > 3 else 0.0)
    total = allgather_rows(comm, canonical_zeros(row)).sum(axis=0)  # one value and zeros per column: exact
    buf[2] = total[-2]
    if len(buf) > 3:
        buf[3] = total[-1]
    buf[0] = float(tree_sum(list(total[:M])))  # micro-batch order
    buf[1] = float(total[M:2 * M].sum())  # integers: exact in any order
    if buf[1] <= 0 or not math.isfinite(buf[0]):
        return False
    roots = []
    for level, index in dyadic_nodes(block):
        tree = TreeSum()
        for _ in range(1 << level):
            store.zero_grad()
            backwards.pop(0)(1.0)  # the gradient of this micro-batch's loss SUM
            tree.push(store.grad)
        roots.append(tree.result())
    store.grad[...] = global_tree_sum(comm, roots, M)
    store.grad *= store.grad.dtype.type(1.0 / buf[1])  # the mean: scaled once, identically
    return True
