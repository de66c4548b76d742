"""The training loop, written once against the Communicator: the same code runs local, under MPI and under Ray.

Per step (GUIDE §1):
    batch (this rank's share of global batch k) -> TaskModel.loss -> [loss_sum, count] all-reduced
    -> backward(1 / global_count) (GradReducer all-reduces bucket by bucket when world_size > 1)
    -> clip by global norm -> optimizer.step(lr(step)) -> metrics (rank 0 -> the sink)
Every rank holds the same parameters after every step: same start (rank 0's broadcast), same summed gradient,
same optimizer arithmetic. Evaluation splits the validation rows across ranks and sums exact statistics.

Non-finite loss or gradient: the decision uses the all-reduced loss and gradient (identical on every rank), so all
ranks skip the step together (no update, optimizer untouched, counted as `skipped_steps`); after run.max_nonfinite
in a row every rank re-runs its share of the batch under engine.debug.detect_nonfinite and the job stops with a
WorkerError naming the first layer (and rank) that produced the non-finite value.
Deterministic mode (run.deterministic): see cluster/deterministic.py — results bitwise equal for W = 1, 2, 4.
Built from: cluster/task_data.py (datasets, loader, eval shares), cluster/optimizer_setup.py (optimizer, schedule),
cluster/worker_process.py (BLAS threads, memory, run files, rank 0's local sink).

    summary = run_worker(cfg, comm, sink)      # cfg: launch.config.Config; sink: launch.rundir.MetricsSink
"""
from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster import interrupt
from ndtrain.cluster.comm.base import Communicator
from ndtrain.engine.module import seed_rngs
from ndtrain.engine.params import ParamStore
from ndtrain.launch.config import Config, ConfigError, config_hash
from ndtrain.launch.config import write_config as write_config_file
from ndtrain.launch.rundir import MetricsSink, NullSink

# The parts the loop is built from, each in a module of its own; imported here by name, so `cluster.worker` keeps
# exporting them (and a test may replace one on this module: Trainer and run_worker look them up here).
from ndtrain.cluster.optimizer_setup import make_optimizer, make_schedule_fn
from ndtrain.cluster.task_data import data_fingerprint, eval_batches, eval_row_count, load_task_data, make_loader
from ndtrain.cluster.worker_process import (default_threads, local_sink, resolved_threads, set_up_process_memory,
                                            write_run_files)


class WorkerError(RuntimeError):
    """A failure inside the loop; the message names the rank and step."""


def run_worker(cfg: Config, comm: Communicator, sink: MetricsSink | None = None, *, write_config: bool = False,
               verbose: bool = False, console=None, on_ready=None) -> dict:
    """Train per cfg on this rank. Returns the summary (on every rank).

    The model, data and optimizer are built (and so every config error raised) before anything is written.
    sink: where rank 0's records go (default: a RunWriter on run.out for rank 0, nothing for the others).
    write_config: rank 0 writes run.out/config.toml (the local backend; the coordinator does it otherwise).
    console: a launch.progress.Console that rank 0's own sink feeds (local runs; replaces `verbose` lines).
    on_ready(trainer): called on rank 0 once everything is built and the run files are written, before step 1.
    Rank 0 always writes run.out/task_info.json (+ tokenizer.json), so the run directory is self-contained.
    Any exception is logged to the sink (with rank and step) and re-raised: a worker never swallows an error."""
    from threadpoolctl import threadpool_limits
    set_up_process_memory()
    with threadpool_limits(limits=resolved_threads(cfg), user_api="blas"):
        trainer = Trainer(cfg, comm, NullSink())
        own_sink = sink is None
        if own_sink:
            if comm.rank == 0 and cfg.run.resume:
                from ndtrain.launch.rundir import truncate_metrics
                truncate_metrics(cfg.run.out, trainer.step)  # records after the checkpoint are replayed
            sink = local_sink(cfg, console, append=bool(cfg.run.resume)) if comm.rank == 0 else NullSink()
        if comm.rank == 0:
            if write_config:
                write_config_file(cfg, Path(cfg.run.out) / "config.toml")
            write_run_files(cfg.run.out, trainer.info, trainer.train_data.tokenizer)
        trainer.sink, trainer.verbose = sink, verbose
        trainer.console = console if own_sink else None
        if on_ready is not None and comm.rank == 0:
            on_ready(trainer)
        try:
            return trainer.run()
        except BaseException as e:
            # a coordinator link (it has .error) gets the failure from the rank's entry point (rank_entry); a run
            # directory gets it as a last record here. Either way the exception propagates.
            if not hasattr(sink, "error") and not isinstance(e, interrupt.Interrupted):
                try:
                    sink.log({"step": trainer.step, "rank": comm.rank, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()})
                except Exception:
                    pass  # the sink itself may be what failed; the original exception still propagates
            raise
        finally:
            if own_sink:
                sink.close()


class Trainer:
    def __init__(self, cfg: Config, comm: Communicator, sink: MetricsSink, verbose: bool = False):
        from ndtrain.launch.models import build_model
        self.cfg, self.comm, self.sink, self.verbose = cfg, comm, sink, verbose
        self.console = None  # a launch.progress.Console inside the sink: it shows the records, not _log
        self.rank, self.world = comm.rank, comm.world_size
        self.step = 0
        run = cfg.run
        self.info, self.train_data, self.val_data = load_task_data(cfg)
        try:
            self.model = build_model(run.model, self.info, cfg)
        except KeyError as e:
            raise ConfigError(f"run.model: {e.args[0]}") from None
        except ValueError as e:  # the builders' checks of model.* against the task (they name the field)
            raise ConfigError(str(e)) from None
        self.model.set_tokenizer(getattr(self.train_data, "tokenizer", None))  # text metrics (BLEU) in evals
        dtype = np.dtype(run.dtype)
        self.store = ParamStore.from_module(self.model.module, dtype=dtype, seed=run.seed)
        # dropout masks differ per rank (independent noise per share of the batch), reproducibly
        seed_rngs(self.model.module, int(np.random.SeedSequence([run.seed, self.rank]).generate_state(1)[0]))

        self._check_same_everywhere()
        comm.broadcast(self.store.data, root=0)
        self._check_same_everywhere(params=True)

        self.optimizer = make_optimizer(cfg.optim, self.store)
        self.lr_at = make_schedule_fn(cfg.optim, run.steps)
        self.loader = make_loader(self.train_data, cfg, self.rank, self.world)
        self.reducer = None
        self.deterministic = bool(run.deterministic)
        if self.deterministic:
            from ndtrain.cluster.deterministic import is_power_of_two
            if not is_power_of_two(self.world) or run.micro_batches % self.world:
                raise ConfigError(f"run.micro_batches: deterministic mode needs a power-of-two world size dividing "
                                  f"{run.micro_batches}; got {self.world} workers")
        self.skipped_steps = 0  # non-finite steps skipped (no update)
        self._nonfinite_in_row = 0
        if self.world > 1 and not self.deterministic:
            from ndtrain.cluster.reducer import GradReducer
            self.reducer = GradReducer(comm, self.store, self.model.module, bucket_mb=cfg.cluster.bucket_mb,
                                       overlap=cfg.cluster.overlap)
        self.ckpt_dir = Path(run.out) / "checkpoints"
        self.evals: list[dict] = []
        self.wall_before = 0.0  # wall seconds of the run before this process (a resumed run continues its clock)
        self._t_start = time.perf_counter()
        if run.resume:
            self._resume(run.resume)

    # -- start-up ----------------------------------------------------------------------------------------------------
    def _check_same_everywhere(self, params: bool = False) -> None:
        """Every rank must run the same config and data (and, after the broadcast, hold the same parameters);
        the error names the first rank that differs."""
        if params:
            mine = {"rank": self.rank, "params": self.store.checksum()}
        else:
            data = [data_fingerprint(d) for d in (self.train_data, self.val_data)]
            mine = {"rank": self.rank, "config": config_hash(self.cfg), "data": data, "param_count": self.store.size}
        records = self.comm.allgather_obj(mine)
        for r in records[1:]:
            for key in mine:
                if key != "rank" and r[key] != records[0][key]:
                    raise WorkerError(f"rank {r['rank']}: {key} {r[key]} differs from rank 0's {records[0][key]}")

    def _resume(self, path: str) -> None:
        """Parameters, optimizer, loader position, schedule step and RNG from a checkpoint (a file, or a checkpoints
        / run directory: its newest valid checkpoint). Any world size: the loader state is (epoch, batches_done) of
        the GLOBAL order; a rank absent from the checkpoint keeps its freshly seeded RNG."""
        try:
            c = ckpt.load_valid(path)
            want = [data_fingerprint(d) for d in (self.train_data, self.val_data)]
            if c.meta.get("data") is not None and c.meta["data"] != want:
                raise ckpt.CheckpointError(f"{c.path}: written for data {c.meta['data']}, this run has {want} "
                                           f"(different data.dir / task / rows?)")
            ckpt.restore(c, self.store, self.model.module)
            if hasattr(self.optimizer, "load_state_dict"):
                self.optimizer.load_state_dict(c.optim)
            self.loader.load_state_dict(c.meta["loader"])
        except (ckpt.CheckpointError, KeyError, ValueError) as e:
            raise ConfigError(f"run.resume: {e}") from None
        ckpt.set_rng_states(self.model.module, c.meta.get("rng", {}).get(str(self.rank), {}))
        self.step = int(c.step)
        self.skipped_steps = int(c.meta.get("skipped_steps", 0))
        self.wall_before = float(c.meta.get("wall_time", 0.0))
        self.comm.broadcast(self.store.data, root=0)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        run = self.cfg.run
        t_start = self._t_start = time.perf_counter()
        window_loss, window_count, window_t, window_steps = 0.0, 0.0, time.perf_counter(), 0
        last_record: dict = {}
        grad_norm = 0.0
        buf = np.zeros(3, dtype=np.float64)  # [loss sum, count, stop votes] of the step, all-reduced
        self._batches = iter(self.loader)  # endless; its state_dict counts the batches handed out
        progress = getattr(self.sink, "progress", None)
        while self.step < run.steps:
            step = self.step  # the step being taken (0-based); after it, self.step counts steps done
            if progress is not None:
                progress(step)  # the coordinator's heartbeats carry it: a failure is reported with its step
            batch = next(self._batches)
            if self.deterministic:
                finite = self._gradient_deterministic(batch, step, buf)
            else:
                finite = self._gradient(batch, step, buf)
            lr = self.lr_at(step)
            if finite:
                grad_norm = self._clip()
                finite = math.isfinite(grad_norm)  # the same reduced gradient everywhere: every rank agrees
            if finite:
                self._nonfinite_in_row = 0
                self.optimizer.step(lr)
                window_loss += buf[0]
                window_count += buf[1]
                window_steps += 1
            else:
                self._skip(batch, step, buf)  # raises after run.max_nonfinite in a row
            self.step = step + 1  # steps done (skipped ones included: the batch was consumed)

            if self.step % run.log_every == 0 or self.step == run.steps:
                now = time.perf_counter()
                dt = now - window_t
                last_record = {"step": self.step, "loss": window_loss / window_count if window_count else math.nan,
                               "lr": lr,
                               "time": now - t_start, "grad_norm": grad_norm,
                               "tokens_per_s": window_count / dt if dt > 0 else 0.0,
                               "step_time": dt / max(window_steps, 1)}
                if self.skipped_steps:
                    last_record["skipped_steps"] = self.skipped_steps
                if self.reducer is not None:  # blocked on the all-reduce in the last step (after overlap)
                    last_record["comm_time"] = self.reducer.comm_wait_s
                last_record.update(self.model.pad_stats(self.comm))  # pad_fraction over the window, all ranks
                self._log(last_record)
                window_loss, window_count, window_t, window_steps = 0.0, 0.0, now, 0
            if run.eval_every and self.step % run.eval_every == 0 and self.step != run.steps:
                self._log(self._eval_record(t_start))
            if run.checkpoint_every and self.step % run.checkpoint_every == 0 and self.step != run.steps:
                self.save_checkpoint()
            if interrupt.agreed(buf[2], self.world) and self.step != run.steps:  # Ctrl-C, SIGTERM: every rank
                if not (run.checkpoint_every and self.step % run.checkpoint_every == 0):
                    self.save_checkpoint()
                raise interrupt.Interrupted(self.step, interrupt.STOP.reason)

        self._check_finite_params()
        record = self._eval_record(t_start)
        final_eval = record["eval"]
        wall = record["time"] = time.perf_counter() - t_start  # the last event's time: the whole loop
        self._log(record)
        self.save_checkpoint()
        summary = {"steps": self.step, "wall_s": wall, "final_loss": last_record.get("loss"),
                   "eval": final_eval, "task": run.task, "model": run.model, "world_size": self.world,
                   "global_batch_size": run.batch_size, "params": int(self.store.size),
                   "param_checksum": self.store.checksum(), "config_hash": config_hash(self.cfg),
                   "skipped_steps": self.skipped_steps, "deterministic": self.deterministic}
        if self.rank == 0:
            self.sink.summary(summary)
        return summary

    # -- one step's gradient ------------------------------------------------------------------------------------
    def _gradient(self, batch, step: int, buf: np.ndarray) -> bool:
        """store.grad = gradient of the global mean loss; buf = [global loss sum, global count]. False (and no
        backward, on every rank alike) when the global loss is not finite."""
        if self.reducer is not None:
            self.reducer.begin(sync=True)
        self.store.zero_grad()
        loss_sum, count, backward = self.model.loss(batch, train=True)
        buf[0], buf[1], buf[2] = loss_sum, count, interrupt.vote()
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

    def _gradient_deterministic(self, micro, step: int, buf: np.ndarray) -> bool:
        """The same, bitwise independent of W (cluster/deterministic.py): `micro` is this rank's block of the fixed
        micro-batches; dropout is seeded per (seed, step, micro-batch index), not per rank."""
        from ndtrain.cluster.deterministic import TreeSum, allgather_rows, canonical_zeros, global_tree_sum, tree_sum
        module, block = self.model.module, self.loader.block
        backwards, sums = [], np.zeros((2, len(block)), dtype=np.float64)
        for j, (i, mb) in enumerate(zip(block, micro)):
            seed_rngs(module, int(np.random.SeedSequence([self.cfg.run.seed, step, i]).generate_state(1)[0]))
            loss_sum, count, backward = self.model.loss(mb, train=True)
            sums[:, j] = loss_sum, count
            backwards.append(backward)
        rows = allgather_rows(self.comm, canonical_zeros(np.append(sums.ravel(), interrupt.vote())))
        buf[2] = rows[:, -1].sum()  # stop votes (cluster/interrupt.py)
        per_rank = rows[:, :-1].reshape(self.world, 2, len(block))  # (W, 2, M/W): rank order = mb order
        buf[0] = float(tree_sum(list(per_rank[:, 0, :].ravel())))
        buf[1] = float(per_rank[:, 1, :].sum())  # integers: exact in any order
        self._check_count(buf, step)
        if not math.isfinite(buf[0]):
            return False
        tree = TreeSum()
        for backward in backwards:
            self.store.zero_grad()
            backward(1.0)  # the gradient of this micro-batch's loss SUM
            tree.push(self.store.grad)
        backwards.clear()
        self.store.grad[...] = global_tree_sum(self.comm, tree.result())
        self.store.grad *= self.store.grad.dtype.type(1.0 / buf[1])  # the mean: scaled once, identically
        return True

    def _check_finite_params(self) -> None:
        """A run must not end (exit 0, a final checkpoint) with NaN/Inf parameters: an update can overflow even when
        every loss and gradient was finite (a huge optim.lr)."""
        if np.isfinite(self.store.data).all():
            return
        from ndtrain.engine.debug import first_nonfinite
        raise WorkerError(f"rank {self.rank}, step {self.step}: the parameters are not finite at the end of training "
                          f"(first: {first_nonfinite(self.store, 'data')!r}); no final checkpoint was written. "
                          f"Lower optim.lr or set optim.grad_clip")

    def _check_count(self, buf: np.ndarray, step: int) -> None:
        if buf[1] <= 0:
            raise WorkerError(f"rank {self.rank}, step {step}: the global batch has no targets to learn from")

    def _skip(self, batch, step: int, buf: np.ndarray) -> None:
        """A non-finite step: no update. Stop (on every rank: the decision is global) after max_nonfinite in a
        row, naming the first layer that produced the non-finite value."""
        self.skipped_steps += 1
        self._nonfinite_in_row += 1
        limit = self.cfg.run.max_nonfinite
        if self.rank == 0:
            self._notice(f"step {step}: non-finite loss or gradient, step skipped ({self._nonfinite_in_row} in a "
                         f"row, stop at run.max_nonfinite={limit})")
        if self._nonfinite_in_row < limit:
            return
        findings = self.comm.allgather_obj(self._locate_nonfinite(batch, buf))
        where = [f for f in findings if f.get("layer")] or [f for f in findings if f.get("what")]
        culprit = "; ".join(f"rank {f['rank']}: {f.get('what')}" for f in where[:1]) or "not reproduced on a re-run"
        raise WorkerError(f"rank {self.rank}, step {step}: {self._nonfinite_in_row} non-finite steps in a row "
                          f"(run.max_nonfinite={limit}, {self.skipped_steps} skipped in all); first non-finite "
                          f"value: {culprit}. Lower optim.lr, set optim.grad_clip, or check the data")

    def _locate_nonfinite(self, batch, buf: np.ndarray) -> dict:
        """Re-run this rank's share of the offending batch under detect_nonfinite: the first layer (forward output
        or input gradient) holding NaN/Inf, else the first non-finite parameter or the loss itself."""
        from ndtrain.engine.debug import NonFiniteError, detect_nonfinite, first_nonfinite
        store, module = self.store, self.model.module
        bad = first_nonfinite(store, "data")
        if bad is not None:
            return {"rank": self.rank, "layer": bad, "what": f"parameter {bad!r} is non-finite"}
        count = buf[1] if math.isfinite(buf[1]) and buf[1] > 0 else 1.0
        micro = batch if isinstance(batch, list) else [batch]
        try:
            with detect_nonfinite(module):
                for mb in micro:
                    store.zero_grad()
                    loss_sum, _, backward = self.model.loss(mb, train=True)
                    if not math.isfinite(loss_sum):
                        return {"rank": self.rank, "what": f"the loss (every layer's output finite): {loss_sum}"}
                    backward(1.0 / count)
                    grad = first_nonfinite(store, "grad")
                    if grad is not None:
                        return {"rank": self.rank, "layer": grad, "what": f"the gradient of parameter {grad!r}"}
        except NonFiniteError as e:
            return {"rank": self.rank, "layer": e.path, "what": str(e)}
        finally:
            store.zero_grad()
        return {"rank": self.rank}

    def _clip(self) -> float:
        """Clip by global norm (when optim.grad_clip > 0); returns the norm before clipping (NaN/Inf: the caller
        skips the step)."""
        from ndtrain.engine.clip import clip_grad_norm, grad_sq_norm
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            return clip_grad_norm(self.store.grad, clip)
        return math.sqrt(grad_sq_norm(self.store.grad))

    def _notice(self, message: str) -> None:
        if self.console is not None:
            self.console.notice(message)
        elif self.verbose:
            print(message, flush=True)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.sink.log(record)
            if self.verbose and self.console is None:
                ev = record.get("eval")
                if ev is not None:
                    print(f"step {record['step']}: eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                          flush=True)
                else:
                    print(f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3g} "
                          f"({record['tokens_per_s']:.0f} items/s)", flush=True)

    # -- evaluation --------------------------------------------------------------------------------------------------
    def wall_time(self) -> float:
        """Seconds of wall time since the run started (across resumes: the checkpoint carries the clock)."""
        return self.wall_before + time.perf_counter() - self._t_start

    def _eval_record(self, t_start: float) -> dict:
        """An eval event: time (seconds since this process's loop started, when the eval began), wall_time (the
        run's wall seconds once its metrics are known: BLEU over wall-clock time), eval_s (its own cost)."""
        t0 = time.perf_counter()
        metrics = self.evaluate()
        return {"step": self.step, "time": t0 - t_start, "wall_time": self.wall_time(),
                "eval_s": time.perf_counter() - t0, "eval": metrics}

    def evaluate(self) -> dict:
        """Metrics over ALL validation rows: each rank sums exact statistics over its contiguous share, the sums are
        gathered and added in rank order (the same result on every rank, for any world size)."""
        module = self.model.module
        module.eval()
        try:
            local: dict[str, float] = {}
            for batch in eval_batches(self.val_data, self.cfg, self.rank, self.world):
                for k, v in self.model.metric_sums(batch).items():
                    local[k] = local.get(k, 0.0) + float(v)
        finally:
            module.train()
        total: dict[str, float] = {}
        for sums in self.comm.allgather_obj(local):
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + v
        if not total:
            raise WorkerError(f"step {self.step}: the validation split of task {self.cfg.run.task!r} is empty")
        metrics = self.model.finalize(total)
        self.evals.append({"step": self.step, **metrics})
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _task_info_record(self) -> dict:
        """TaskInfo for the checkpoint (launch/restore.py's fallback when DIR/task_info.json is gone); a large
        tokenizer (BPE) is left to DIR/tokenizer.json rather than copied into every checkpoint."""
        d = self.info.to_dict()
        if len(d.get("extra", {}).get("tokenizer_json") or "") > 64_000:
            d["extra"] = {k: v for k, v in d["extra"].items() if k != "tokenizer_json"}
        return d

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes (every rank holds the same parameters and optimizer state); RNG states of all ranks are
        gathered so dropout resumes exactly."""
        rngs = self.comm.allgather_obj(ckpt.rng_states(self.model.module))
        path = None
        if self.rank == 0:
            optim_state = self.optimizer.state_dict() if hasattr(self.optimizer, "state_dict") else {}
            meta = {"loader": self.loader.state_dict(), "schedule_step": self.step,
                    "rng": {str(r): s for r, s in enumerate(rngs)}, "config": self.cfg.to_dict(),
                    "config_hash": config_hash(self.cfg), "world_size": self.world,
                    "param_checksum": self.store.checksum(), "skipped_steps": self.skipped_steps,
                    "wall_time": self.wall_time(),
                    "data": [data_fingerprint(d) for d in (self.train_data, self.val_data)],
                    "task_info": self._task_info_record()}
            path = ckpt.save(self.ckpt_dir, self.step, self.store, buffers=dict(self.model.module.named_buffers()),
                             optim_state=optim_state, meta=meta, keep=self.cfg.run.keep_checkpoints)
        self.comm.barrier()
        return path
