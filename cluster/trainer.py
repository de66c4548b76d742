"""The training loop, written once against the Communicator: the same code runs local, under MPI and under Ray.

    summary = Trainer(job, comm, sink).run()     # job: cluster.job.TrainJob, built by launch.job.build_job

One step (GUIDE §1):
    batch (this rank's share of global batch k) -> model.loss -> [loss_sum, count] all-reduced
    -> backward(1 / global_count); the GradReducer all-reduces gradient buckets while backward runs (W > 1)
    -> clip by global norm -> optimizer.step(lr(step)) -> metrics (rank 0 -> the sink) -> eval -> checkpoint
Every rank holds the same parameters after every step: same start (rank 0's broadcast), same summed gradient,
same optimizer arithmetic. Evaluation splits the validation rows across ranks and sums exact statistics.

A step whose all-reduced loss or gradient is not finite is skipped on every rank alike (cluster/nonfinite.py);
deterministic mode computes the gradient bitwise independent of W (cluster/deterministic.py); checkpoints record
what cluster/checkpoint_meta.py says; Ctrl-C / SIGTERM stop every rank after the same step, with a checkpoint
(cluster/interrupt.py: the stop vote rides in the step's all-reduce). Rate figures (tokens_per_s, step_time) cover training only: time spent in
evaluation and checkpoints is left out of the window they are measured over.
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback

import numpy as np

from ndtrain.cluster import interrupt
from ndtrain.cluster.checkpoint_meta import save_checkpoint
from ndtrain.cluster.comm.counters import CommWindow
from ndtrain.cluster.deterministic import deterministic_gradient
from ndtrain.cluster.elastic_rank import GroupBroken, regroup
from ndtrain.cluster.job import TrainJob
from ndtrain.cluster.link_probe import advice, probe_link
from ndtrain.cluster.local_sgd import LocalSGD
from ndtrain.cluster.nonfinite import WorkerError, check_finite_params, locate_nonfinite, nonfinite_error
from ndtrain.cluster.reducer import GradReducer
from ndtrain.cluster.sink import NullSink
from ndtrain.engine.clip import clip_grad_norm, grad_sq_norm


class Trainer:
    def __init__(self, job: TrainJob, comm, sink=None, membership=None):
        """membership: an elastic Ray rank's cluster.elastic_rank.Membership (None: the group never changes). A
        joining rank does no collective here: it receives the state when it joins (elastic_rank.regroup)."""
        self.job, self.comm, self.sink = job, comm, sink if sink is not None else NullSink()
        self.model, self.store, self.settings = job.model, job.store, job.settings
        self.rank, self.world = comm.rank, comm.world_size
        self.step, self.skipped_steps = job.start_step, job.skipped_steps
        self._t_start = time.perf_counter()  # the loop's start (reset by run)
        self._nonfinite_in_row = 0
        self.evals: list[dict] = []
        self.membership = membership
        self.done_loader = job.loader.state_dict()  # the loader's position after the steps done (elastic regroups)
        self.link = self.reducer = self.local = None
        if membership is not None and membership.joining:
            return
        self._check_same_everywhere({**job.fingerprints, "param_count": self.store.size})
        comm.broadcast(self.store.data, root=0)
        self._check_same_everywhere({"params": self.store.checksum()})
        # the link between ranks, measured now (cluster/link_probe.py)
        if self.world > 1 and self.settings.link_probe_mb > 0:
            self.link = probe_link(comm, int(self.settings.link_probe_mb * (1 << 20)))
        if self.settings.sync_every:  # DiLoCo: local inner steps, a parameter all-reduce every H (cluster/local_sgd.py)
            self.local = LocalSGD(job, comm)
        self._make_reducer()
        if self.reducer is not None and job.rank_state:  # this rank's compression residuals (same world size only)
            self.reducer.load_state_dict(job.rank_state)

    def _make_reducer(self) -> None:
        st = self.settings
        self.reducer = None
        if self.local is None and self.world > 1 and not st.deterministic:
            self.reducer = GradReducer(self.comm, self.store, self.model.module, bucket_mb=st.bucket_mb,
                                       overlap=st.overlap, compress=st.compress, powersgd_rank=st.powersgd_rank,
                                       seed=st.seed)

    def reset_after_regroup(self) -> None:
        """After elastic_rank.regroup: a reducer on the new communicator (compression residuals start again at
        zero), a fresh iterator over the re-sliced loader, fresh comm counters."""
        self._make_reducer()
        self._batches = iter(self.job.loader)
        self._regrouped = True

    def _check_same_everywhere(self, mine: dict) -> None:
        """Every rank must run the same config and data (and, after the broadcast, hold the same parameters);
        the error names the first rank that differs."""
        records = self.comm.allgather_obj({"rank": self.rank, **mine})
        for r in records[1:]:
            for key in mine:
                if r[key] != records[0][key]:
                    raise WorkerError(f"rank {r['rank']}: {key} {r[key]} differs from rank 0's {records[0][key]}")

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train up to settings.steps; returns the summary (on every rank). An exception is logged to a sink that
        has no error channel of its own (the run directory: its last record) and re-raised."""
        try:
            # overflow / invalid-value warnings would repeat on every rank; non-finite steps are detected, skipped and
            # diagnosed by the loop itself (cluster/nonfinite.py), which names the layer
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return self._run()
        except BaseException as e:
            # a coordinator link reports it from the rank's entry point; a requested stop is no error
            if not hasattr(self.sink, "error") and not isinstance(e, interrupt.Interrupted):
                try:
                    self.sink.log({"step": self.step, "rank": self.rank, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()})
                except Exception:
                    pass  # the sink itself may be what failed; the original exception still propagates
            raise

    def _run(self) -> dict:
        s = self.settings
        t_start = self._t_start = time.perf_counter()
        self._window = [0.0, 0.0, 0, t_start]  # loss sum, count, steps, start time of the logging window
        self._last_record: dict = {}
        self._grad_norm = 0.0
        # [loss sum, count, stop votes, membership votes] of the step, all-reduced
        self._buf = np.zeros(4, dtype=np.float64)
        self._batches = iter(self.job.loader)  # endless; its state_dict counts the batches handed out
        self._regrouped = self.membership is not None and self.membership.joining
        self._window_comm = None
        self._advised = self.link is None or bool(s.compress or s.sync_every)
        if self.link is not None and hasattr(self.sink, "watch_counters"):
            self.sink.link_bps = self.link["bandwidth_Bps"]  # heartbeats: the stall limit of a call without progress
        while True:
            try:
                if self._regrouped:  # a joining rank starts here; the others after a regroup
                    if self.membership.joining:
                        regroup(self, "joining")
                    self._regrouped = False
                    self._window = [0.0, 0.0, 0, time.perf_counter()]
                    self._window_comm = None
                if self._window_comm is None:
                    counters = getattr(self.comm, "counters", None)  # bytes and blocked time, counted by the transport
                    self._window_comm = CommWindow(counters) if counters is not None else False
                if self.step >= s.steps:
                    return self._finish(t_start)
                self._one_step(t_start)
                if self._buf[3] > 0 and self.step < s.steps:  # every rank voted alike: a rank joins now
                    regroup(self, "a rank joins")
            except GroupBroken as e:
                if self.membership is None:
                    raise
                regroup(self, str(e))

    def _one_step(self, t_start: float) -> None:
        s, buf = self.settings, self._buf
        window_comm = self._window_comm or None
        progress = getattr(self.sink, "progress", None)
        step = self.step  # the step being taken (0-based); after it, self.step counts steps done
        if progress is not None:
            progress(step)  # heartbeats carry it (a failure is reported with its step); the progress bar
        batch = next(self._batches)
        buf[3] = self.membership.vote() if self.membership is not None else 0.0
        finite = self._gradient(batch, step, buf)
        lr = self.job.lr_at(step)
        if finite:
            self._grad_norm = self._clip()
            finite = math.isfinite(self._grad_norm)  # the same reduced gradient everywhere: every rank agrees
        w = self._window
        if finite:
            self._nonfinite_in_row = 0
            self.job.optimizer.step(lr)
            w[0] += buf[0]
            w[1] += buf[1]
            w[2] += 1
        else:
            self._skip(batch, step, buf)  # raises after max_nonfinite in a row
        self.step = step + 1  # steps done (skipped ones included: the batch was consumed)
        self.done_loader = self.job.loader.state_dict()
        if self.membership is not None and self.membership.resumed_step is not None and self.rank == 0:
            self.membership.event("stepped", self.step)  # the first step after a regroup is done
            self.membership.resumed_step = None
        log_now = self.step % s.log_every == 0 or self.step == s.steps
        if self.local is not None:  # the outer step at a sync step; window sums and stop votes all-reduced
            w[0], w[1] = self.local.after_step(self.step, buf, w[0], w[1], log_now)

        if log_now:
            now = time.perf_counter()
            dt = now - w[3]
            rec = {"step": self.step, "loss": w[0] / w[1] if w[1] else math.nan, "lr": lr, "time": now - t_start,
                   "grad_norm": self._grad_norm, "tokens_per_s": w[1] / dt if dt > 0 else 0.0,
                   "step_time": dt / max(w[2], 1), "world_size": self.world}
            if self.skipped_steps:
                rec["skipped_steps"] = self.skipped_steps
            if self.reducer is not None:  # blocked on the all-reduce in the last step (after overlap)
                rec["comm_time"] = self.reducer.comm_wait_s
            if self.local is not None:  # the outer syncs' time in this window, per step
                rec["comm_time"] = self.local.sync_s / max(w[2], 1)
                self.local.sync_s = 0.0
            rec.update(self.model.pad_stats(self.comm))  # pad_fraction over the window, all ranks
            if window_comm is not None:
                rec.update(window_comm.per_step(w[2]))
                window_comm.reset()
            if self.link is not None:
                rec["link_bandwidth_Bps"] = self.link["bandwidth_Bps"]
            if not self._advised:
                self._advised = True
                self._advise(rec)
            self._log(rec)
            self._last_record = rec
            self._window = w = [0.0, 0.0, 0, now]
        t_aside = time.perf_counter()
        if window_comm is not None:
            window_comm.aside_begin()
        if s.eval_every and self.step % s.eval_every == 0 and self.step != s.steps:
            self._log(self._eval_record(t_start))
        if s.checkpoint_every and self.step % s.checkpoint_every == 0 and self.step != s.steps:
            self.save_checkpoint()
        w[3] += time.perf_counter() - t_aside  # eval and checkpoints are not training time
        if window_comm is not None:
            window_comm.aside_end()
        if interrupt.agreed(buf[2], self.world) and self.step != s.steps:  # Ctrl-C, SIGTERM: every rank
            if not (s.checkpoint_every and self.step % s.checkpoint_every == 0):
                self.save_checkpoint()
            raise interrupt.Interrupted(self.step, interrupt.STOP.reason)

    def _finish(self, t_start: float) -> dict:
        """After the last step: final evaluation, checkpoint, summary (on every rank)."""
        check_finite_params(self.store, self.rank, self.step)
        record = self._eval_record(t_start)
        final_eval = record["eval"]
        wall = record["time"] = time.perf_counter() - t_start  # the last event's time: the whole loop
        self._log(record)
        self.save_checkpoint()
        if self.link is not None:
            self.job.summary["link"] = self.link
        summary = {"steps": self.step, "wall_s": wall, "final_loss": self._last_record.get("loss"),
                   "eval": final_eval, **self.job.summary, "world_size": self.world,
                   "params": int(self.store.size), "param_checksum": self.store.checksum(),
                   "skipped_steps": self.skipped_steps, "deterministic": bool(self.settings.deterministic)}
        if self.rank == 0:
            self.sink.summary(summary)
        return summary

    # -- one step's gradient -----------------------------------------------------------------------------------------
    def _gradient(self, batch, step: int, buf: np.ndarray) -> bool:
        """store.grad = gradient of the global mean loss; buf = [global loss sum, global count, stop votes]
        (cluster/interrupt.py). False (and no backward, on every rank alike) when the global loss is not finite."""
        if self.local is not None:
            return self.local.gradient(batch, buf, step)
        if self.settings.deterministic:
            finite = deterministic_gradient(self.model, self.store, self.comm, batch, self.job.loader.block,
                                            self.settings.seed, step, buf, vote=interrupt.vote(),
                                            micro_batches=self.job.loader.micro_batches)
            self._check_count(buf, step)
            return finite
        if self.reducer is not None:
            self.reducer.begin(sync=True)
        self.store.zero_grad()
        loss_sum, count, backward = self.model.loss(batch, train=True)
        buf[0], buf[1], buf[2] = loss_sum, count, interrupt.vote()  # buf[3]: membership votes (set by the loop)
        self.comm.allreduce(buf)  # global loss sum and count (every rank's share of batch k), stop votes
        self._check_count(buf, step)
        if not math.isfinite(buf[0]):
            if self.reducer is not None:
                self.reducer.close()  # no bucket was launched: backward never ran, on any rank
            return False
        backward(1.0 / buf[1])
        if self.reducer is not None:
            self.reducer.finish()  # store.grad now holds the gradient of the global mean loss
        return True

    def _advise(self, record: dict) -> None:
        """Rank 0, after the first window: one line naming the fix when the gradient's all-reduce over the measured
        link would take more than ~30% of a step (cluster/link_probe.py)."""
        notice = getattr(self.sink, "notice", None)
        if self.rank != 0 or notice is None:
            return
        compute = max(0.0, record.get("step_time", 0.0) - record.get("comm_blocked_s", 0.0))
        buckets = len(self.reducer.buckets) if self.reducer is not None else 1
        line = advice(self.link, int(self.store.grad.nbytes), compute, self.world, buckets)
        if line:
            notice(line)

    def _check_count(self, buf: np.ndarray, step: int) -> None:
        if buf[1] <= 0:
            raise WorkerError(f"rank {self.rank}, step {step}: the global batch has no targets to learn from")

    def _clip(self) -> float:
        """Clip by global norm (when grad_clip > 0); returns the norm before clipping (NaN/Inf: skip the step)."""
        clip = self.settings.grad_clip
        if clip > 0:
            return clip_grad_norm(self.store.grad, clip)
        return math.sqrt(grad_sq_norm(self.store.grad))

    def _skip(self, batch, step: int, buf: np.ndarray) -> None:
        """A non-finite step: no update. Stop (on every rank: the decision is global) after max_nonfinite in a
        row, naming the first layer that produced the non-finite value."""
        self.skipped_steps += 1
        self._nonfinite_in_row += 1
        limit = self.settings.max_nonfinite
        notice = getattr(self.sink, "notice", None)
        if self.rank == 0 and notice is not None:
            notice(f"step {step}: non-finite loss or gradient, step skipped ({self._nonfinite_in_row} in a row, "
                   f"stop at run.max_nonfinite={limit})")
        if self._nonfinite_in_row < limit:
            return
        if self.local is not None:  # a local decision (no collective: the other ranks may be mid-period)
            raise WorkerError(f"rank {self.rank}, step {step}: {self._nonfinite_in_row} non-finite local steps in a "
                              f"row (run.max_nonfinite={limit})")
        findings = self.comm.allgather_obj(locate_nonfinite(self.model, self.store, batch, buf[1], self.rank))
        raise nonfinite_error(findings, self.rank, step, self._nonfinite_in_row, limit, self.skipped_steps)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.sink.log(record)

    # -- evaluation and checkpoints -----------------------------------------------------------------------------------
    def wall_time(self) -> float:
        """Seconds of wall time since the run started (across resumes: the checkpoint carries the clock)."""
        return self.job.wall_before + time.perf_counter() - self._t_start

    def _eval_record(self, t_start: float) -> dict:
        """An eval event: time (seconds since this process's loop started, when the eval began), wall_time (the
        run's wall seconds once its metrics are known: BLEU over wall-clock time), eval_s (its own cost)."""
        t0 = time.perf_counter()
        metrics = self.evaluate()
        return {"step": self.step, "time": t0 - t_start, "wall_time": self.wall_time(),
                "eval_s": time.perf_counter() - t0, "eval": metrics}

    def evaluate(self) -> dict:
        """Metrics over the validation rows: each rank sums exact statistics over its share, the sums are gathered
        and added in rank order (the same result on every rank, for any world size)."""
        module = self.model.module
        module.eval()
        anchor = self.local.anchor_params(fresh=True) if self.local is not None else contextlib.nullcontext()
        try:
            anchor.__enter__()
            local: dict[str, float] = {}
            for batch in self.job.eval_batches():
                for k, v in self.model.metric_sums(batch).items():
                    local[k] = local.get(k, 0.0) + float(v)
        finally:
            anchor.__exit__(None, None, None)
            module.train()
        total: dict[str, float] = {}
        for sums in self.comm.allgather_obj(local):
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + v
        if not total:
            raise WorkerError(f"step {self.step}: the validation split of task {self.job.summary.get('task')!r} is empty")
        metrics = self.model.finalize(total)
        self.evals.append({"step": self.step, **metrics})
        return metrics

    def save_checkpoint(self):
        if self.local is not None:  # param/ holds the anchor (what eval and generate should see); each rank's own
            mine = {k: v.copy() for k, v in self.local.rank_state().items()}  # parameters go under rank/<r>/
            with self.local.anchor_params():
                return save_checkpoint(self.job, self.comm, self.step, self.skipped_steps, self.wall_time(),
                                       rank_state=mine, shared_state=self.local.shared_state())
        rank_state = self.reducer.state_dict() if self.reducer is not None else None
        return save_checkpoint(self.job, self.comm, self.step, self.skipped_steps, self.wall_time(),
                               rank_state=rank_state)
