"""DiLoCo / local SGD in the training loop (cluster.sync_every = H; Douillard et al. 2023; cluster/diloco.py has the
outer step).

Each rank takes inner optimizer steps on its own share of successive global batches (the loader's order, fixed by
(seed, epoch), is unchanged), with no gradient all-reduce: the gradient is that of the rank's LOCAL mean loss. After
every H steps (and after the last step of the run) the ranks all-reduce the parameter delta anchor - theta_i and
every rank applies the same outer Nesterov step: the parameters are bitwise equal on every rank again.

    local = LocalSGD(job, comm)                          # after the start-up broadcast
    finite = local.gradient(batch, buf, step)                # buf = [local loss sum, local count, local stop vote]
    ... optimizer.step(lr) ...
    loss, count = local.after_step(step_done, buf, loss, count, log_now)

What the loop reports on inner steps: `loss` is every rank's local loss summed over the window's targets, over the
sum of targets (the token-weighted mean of the ranks' local losses, each on its own parameters); the token count
(tokens_per_s) is the sum over ranks. Both are all-reduced only at log steps; stop votes (Ctrl-C) at log and sync
steps, so communication happens only there.

Checkpoints: the shared state (anchor, outer momentum) once; each rank's own parameters and inner optimizer state
under rank/<r>/ (cluster/checkpoint_meta.py). A resume continues bitwise on the same world size; another world
size is refused (each rank's inner trajectory belongs to its share of the batch).
Evaluation uses the anchor (the last synchronised parameters), the same on every rank.

cluster.sync_overlap: the outer gradient's exchange runs while the next tau inner steps do (cluster.sync_delay,
default H), queued a few chunks per step (cluster/outer_exchange.py), and its outer step is applied tau steps
after the launch (cluster/diloco.py OverlappedDiLoCo); at the run's end the last one is waited for and applied.
Launches happen only at sync steps, so the apply step is step % H == tau, also after a resume. A checkpoint waits
for the sum in flight and saves it (shared: it is applied at its step, as without the checkpoint). cluster.compress fp16 / bf16: the
outer gradient goes as 2-byte payloads with error feedback (residuals per rank, in checkpoints).
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from ndtrain.cluster import interrupt
from ndtrain.cluster.deterministic import TreeSum
from ndtrain.cluster.diloco import DiLoCo, OverlappedDiLoCo
from ndtrain.cluster.nonfinite import WorkerError
from ndtrain.cluster.outer_exchange import OuterExchange, PendingSum
from ndtrain.engine.module import seed_rngs

OPTIM = "optim/"
EF = "ef/"  # the outer exchange's error-feedback residuals (cluster.compress fp16 / bf16)


class LocalSGD:
    def __init__(self, job, comm):
        s = job.settings
        self.job, self.comm, self.store = job, comm, job.store
        self.every, self.steps = int(s.sync_every), int(s.steps)
        self.outer = DiLoCo(self.store.data, lr=s.outer_lr, momentum=s.outer_momentum)
        self.sync_s = 0.0
        size = self.store.data.size
        # overlapped: chunks of bucket_mb, all queued within the first half of the round (a log step's small
        # all-reduce then waits for few of them); otherwise one exchange of the whole vector, at once
        overlap = bool(getattr(s, "sync_overlap", False))
        chunk = int(s.bucket_mb * (1 << 20)) if overlap else 4 * max(1, size)
        self.exchange = OuterExchange(comm, size, scheme=s.compress, chunk_bytes=chunk)
        # tau: inner steps from an exchange's launch to its outer step (cluster.sync_delay; 0: H, the next sync)
        self.delay = min(self.every, int(getattr(s, "sync_delay", 0) or self.every))
        self.chunks_per_step = self.exchange.per_step((self.delay + 1) // 2)
        self.overlapped = OverlappedDiLoCo(self.outer, self.store.data) if overlap else None
        # the exchange in flight (overlapped), launched at the last sync step and applied delay steps after it
        self.pending: PendingSum | None = None
        if job.shared_state:
            self.outer.load_state_dict(job.shared_state)
            if self.overlapped is not None and np.size(job.shared_state.get("pending", ())):
                self.pending = PendingSum.done(np.array(job.shared_state["pending"], dtype=self.store.data.dtype))
        if job.rank_state_world and job.rank_state_world != comm.world_size:
            raise WorkerError(f"rank {comm.rank}: a DiLoCo checkpoint (cluster.sync_every) resumes on the world "
                              f"size it was written with ({job.rank_state_world} workers), not {comm.world_size}")
        if job.rank_state:
            self.load_rank_state(job.rank_state)

    # -- one inner step ----------------------------------------------------------------------------------------------
    def gradient(self, batch, buf: np.ndarray, step: int) -> bool:
        """store.grad = the gradient of this rank's local mean loss; buf = [local loss sum, local count, vote]."""
        model = self.job.model
        if self.job.settings.deterministic:
            return self._micro_gradient(batch, buf, step)
        self.store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        buf[0], buf[1], buf[2] = loss_sum, count, interrupt.vote()
        if not math.isfinite(buf[0]):
            return False
        if count > 0:
            backward(1.0 / count)
        return True

    def _micro_gradient(self, micro: list, buf: np.ndarray, step: int) -> bool:
        """Deterministic mode: this rank's fixed micro-batches (cluster/deterministic.py), dropout seeded per
        (seed, step, micro-batch), their gradients summed by the fixed tree, scaled by 1 / local count once."""
        model, store, s = self.job.model, self.store, self.job.settings
        backwards, loss, count = [], 0.0, 0.0
        for i, mb in zip(self.job.loader.block, micro):
            seed_rngs(model.module, int(np.random.SeedSequence([s.seed, step, i]).generate_state(1)[0]))
            ls, c, backward = model.loss(mb, train=True)
            loss, count = loss + ls, count + c
            backwards.append(backward)
        buf[0], buf[1], buf[2] = loss, count, interrupt.vote()
        if not math.isfinite(loss):
            return False
        tree = TreeSum()
        for backward in backwards:
            store.zero_grad()
            backward(1.0)
            tree.push(store.grad)
        store.grad[...] = tree.result()
        if count > 0:
            store.grad *= store.grad.dtype.type(1.0 / count)
        return True

    def is_sync(self, step_done: int) -> bool:
        return step_done % self.every == 0 or step_done == self.steps

    def after_step(self, step_done: int, buf: np.ndarray, loss: float, count: float, log_now: bool):
        """At a sync step: the outer step. At a sync or log step: buf[2] = the stop votes of every rank; at a log
        step (loss, count) of the window summed over ranks. Elsewhere buf[2] = 0 (no communication)."""
        sync = self.is_sync(step_done)
        small = np.array([buf[2], loss, count], dtype=np.float64)
        if sync or log_now:
            self.comm.allreduce(small)
            buf[2] = small[0]
        else:
            buf[2] = 0.0
        if sync:
            self.synchronise(final=step_done == self.steps)
        elif self.pending is not None and step_done % self.every >= self.delay:
            self._apply_pending()  # tau steps after its launch: the outer step, every rank at the same step
        elif self.pending is not None:
            self.pending.advance()  # the next chunks of the outer gradient in flight, after this step's collectives
        if log_now:
            return float(small[1]), float(small[2])
        return loss, count

    def synchronise(self, final: bool = False) -> None:
        """The outer step: the sum over ranks of anchor - theta_i, then Nesterov on the mean (every rank alike).
        Overlapped (cluster.sync_overlap): apply the sum in flight if it is still pending (tau = H), launch this
        round's (cluster/diloco.py OverlappedDiLoCo); at the run's end (final) wait for it and apply it too."""
        t0 = time.perf_counter()
        x, world = self.store.data, self.comm.world_size
        if self.overlapped is None:
            delta = self.outer.outer_gradient(x)
            if self.exchange.compressor is not None:
                delta = self.exchange.start(delta).result()
            elif world > 1:
                self.comm.allreduce(delta)
            self.outer.outer_step(x, delta, world)
        else:
            total = self.pending.result() if self.pending is not None else None
            d = self.overlapped.sync(x, total, world)
            self.pending = self.exchange.start(d, self.chunks_per_step)
            if final:
                self.overlapped.finish(x, self.pending.result(), world)
                self.pending = None
        self.sync_s += time.perf_counter() - t0

    def _apply_pending(self) -> None:
        """Overlapped, tau < H: wait for the exchange in flight and apply its outer step (x_i keeps its progress
        since the launch)."""
        t0 = time.perf_counter()
        self.overlapped.apply(self.store.data, self.pending.result(), self.comm.world_size)
        self.pending = None
        self.sync_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def anchor_params(self, fresh: bool = False):
        """The anchor in store.data for the duration (evaluation between syncs), then the local parameters back.
        fresh (evaluation): with an overlapped exchange in flight, the anchor its outer step will give (the sum is
        waited for now and still applied at its step: the training numbers do not change), so an evaluation sees
        every round launched so far, as it does without overlap."""
        local = self.store.data.copy()
        if fresh and self.pending is not None:  # result() keeps the sum: the apply step finds it there
            self.store.data[...] = self.outer.peek(self.pending.result(), self.comm.world_size)
        else:
            self.store.data[...] = self.outer.anchor
        try:
            yield
        finally:
            self.store.data[...] = local

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def shared_state(self) -> dict:
        """The anchor and outer momentum; overlapped, also the sum of the exchange in flight (waited for here: every
        rank holds the same; it is applied at the next sync as it would have been)."""
        state = self.outer.state_dict()
        if self.overlapped is not None:
            state["pending"] = (self.pending.result().copy() if self.pending is not None
                                else np.zeros(0, dtype=self.store.data.dtype))
            if self.pending is not None:
                self.pending = PendingSum.done(state["pending"])
        return state

    def rank_state(self) -> dict:
        opt = self.job.optimizer
        state = {"params": self.store.data}
        if self.overlapped is not None:
            state["base"] = self.overlapped.base
        state.update({EF + k: v for k, v in self.exchange.state_dict().items()})
        if hasattr(opt, "state_dict"):
            state.update({OPTIM + k: v for k, v in opt.state_dict().items() if isinstance(v, np.ndarray)
                          and v.ndim == 1})
        return state

    def load_rank_state(self, state: dict) -> None:
        self.store.data[...] = state["params"]
        if self.overlapped is not None and "base" in state:
            self.overlapped.base[...] = state["base"]
        self.exchange.load_state_dict({k[len(EF):]: v for k, v in state.items() if k.startswith(EF)})
        opt = self.job.optimizer
        if hasattr(opt, "load_state_dict"):
            mine = {k[len(OPTIM):]: v for k, v in state.items() if k.startswith(OPTIM)}
            full = opt.state_dict()
            full.update(mine)
            opt.load_state_dict(full)
