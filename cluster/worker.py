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

    summary = run_worker(cfg, comm, sink)      # cfg: launch.config.Config; sink: launch.rundir.MetricsSink
"""
from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.comm.base import Communicator
from ndtrain.engine.module import seed_rngs
from ndtrain.engine.params import ParamStore
from ndtrain.launch.config import Config, ConfigError, config_hash
from ndtrain.launch.config import write_config as write_config_file
from ndtrain.launch.rundir import MetricsSink, NullSink, RunWriter


class WorkerError(RuntimeError):
    """A failure inside the loop; the message names the rank and step."""


# -- the parts the loop is built from (data, optimizer, schedule), from the config ----------------------------------
def load_task_data(cfg: Config):
    """(TaskInfo, train Dataset, val Dataset) from, in order of preference: a prepared shard directory (data.dir,
    with train/ and val/), the shard cache (data.cache: built-in task prepared once, then memory-mapped), or the
    built-in task generated in memory. Bad data is a ConfigError naming the field and the file."""
    from ndtrain import data as nd
    from ndtrain.data.prepare import TRAIN_DIR, VAL_DIR, default_val_rows
    run, dcfg = cfg.run, cfg.data
    rows = dcfg.rows or None
    try:
        if dcfg.dir or dcfg.cache:
            root = Path(dcfg.dir) if dcfg.dir else nd.ensure_prepared(run.task, dcfg.cache, rows, run.seed)
            train = nd.open_dataset(root / TRAIN_DIR)
            val = nd.open_dataset(root / VAL_DIR, expect=train.info)  # the same vocabulary / shapes as train
            return train.info, train, val
    except nd.DataError as e:
        raise ConfigError(f"data.{'dir' if dcfg.dir else 'cache'}: {e}") from None
    if run.task not in nd.TASKS:
        raise ConfigError(f"run.task: unknown task {run.task!r}; built-in tasks: {', '.join(nd.TASKS)}")
    # the same split sizes as `ndtrain data prepare`, so in-memory and sharded runs see the same rows
    train = nd.as_dataset(nd.generate(run.task, rows, run.seed, "train"))
    val = nd.as_dataset(nd.generate(run.task, default_val_rows(run.task, rows), run.seed, "val"))
    return train.info, train, val


def data_fingerprint(ds) -> str:
    """What ranks compare at start: the manifest's hash for shards, the row count for in-memory data."""
    import hashlib
    manifest = Path(ds.source) / "manifest.json"
    if ds.source != "<memory>" and manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return f"{ds.info.name}:{ds.n_rows()} rows"


def make_loader(dataset, cfg: Config, rank: int, world: int):
    """This rank's share of every global batch (ndtrain.data.loader.Loader: order from (seed, epoch) only); in
    deterministic mode a list of this rank's fixed micro-batches of it (cluster.deterministic.MicroBatchLoader)."""
    from ndtrain.data.loader import Loader
    try:
        if cfg.run.deterministic:
            from ndtrain.cluster.deterministic import MicroBatchLoader
            return MicroBatchLoader(dataset, cfg.run.batch_size, rank, world, cfg.run.seed, cfg.run.micro_batches)
        return Loader(dataset, cfg.run.batch_size, rank, world, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(f"run.batch_size: {e}") from None


def eval_row_count(dataset, cfg: Config) -> int:
    """Validation rows an evaluation covers: all of them, or the first run.eval_rows."""
    n = dataset.n_rows()
    return min(n, cfg.run.eval_rows) if cfg.run.eval_rows else n


def eval_batches(dataset, cfg: Config, rank: int, world: int):
    """Rank r's share of the validation rows [0, eval_row_count): in order, global batches of eval_batch_size * W
    rows, each split by plan.rank_share (every row once, none dropped; a share may be short or empty). A fixed
    prefix of the split, so run.eval_rows takes the same rows - and gives the same sums - on any number of workers
    (the order of Loader.for_eval, which this reproduces for eval_rows = 0)."""
    from ndtrain.data.plan import rank_share
    n, size = eval_row_count(dataset, cfg), cfg.run.eval_batch_size * world
    for start in range(0, n, size):
        rows = rank_share(np.arange(start, min(start + size, n), dtype=np.int64), rank, world)
        if len(rows):
            yield dataset.batch(rows)


def make_schedule_fn(ocfg, total_steps: int):
    """lr(step) from optim.schedule + optim.schedule_kwargs; lr / max_lr and total_steps filled in from the
    config when the schedule takes them and they are not given."""
    import dataclasses
    from ndtrain.engine import schedules
    kwargs = dict(ocfg.schedule_kwargs)
    cls = schedules.SCHEDULES.get(ocfg.schedule)
    if cls is None:
        raise ConfigError(f"optim.schedule: unknown schedule {ocfg.schedule!r}; known: "
                          f"{', '.join(sorted(schedules.SCHEDULES))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in (("lr", ocfg.lr), ("max_lr", ocfg.lr), ("total_steps", total_steps)):
        if key in fields:
            kwargs.setdefault(key, value)
    try:
        return schedules.make_schedule(ocfg.schedule, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optim.schedule_kwargs: {e}") from None


def make_optimizer(ocfg, store):
    """The optimizer named by optim.name over the flat buffers (engine.optim); `step(lr)` updates in place.
    Each optimizer gets the optim.* fields its constructor takes (betas for Adam, momentum for SGD, ...)."""
    import inspect
    from ndtrain.engine import optim
    cls = optim.OPTIMIZERS.get(ocfg.name)
    if cls is None:
        raise ConfigError(f"optim.name: unknown optimizer {ocfg.name!r}; known: {', '.join(sorted(optim.OPTIMIZERS))}")
    given = {"lr": ocfg.lr, "betas": tuple(ocfg.betas), "eps": ocfg.eps, "momentum": ocfg.momentum,
             "nesterov": ocfg.nesterov, "weight_decay": ocfg.weight_decay}
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls(store, **{k: v for k, v in given.items() if k in accepted})
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None


def default_threads(workers: int) -> int:
    """BLAS threads per worker when run.threads is 0: OMP/OPENBLAS_NUM_THREADS if the user set them, else
    cores // workers."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def resolved_threads(cfg: Config) -> int:
    """BLAS threads of each worker: 1 in deterministic mode (a GEMM's summation order then depends only on its
    shapes), else run.threads, else default_threads."""
    return 1 if cfg.run.deterministic else (cfg.run.threads or default_threads(cfg.run.workers))


_MEMORY_SET = False


def set_up_process_memory() -> bool:
    """Once per worker process: glibc keeps freed memory for reuse, so steady-state steps do not page-fault through
    their activations again (engine.memory.retain_freed_memory; measured tens of ms per step). False where it is
    unavailable (not glibc, or an engine without it)."""
    global _MEMORY_SET
    if _MEMORY_SET:
        return True
    try:
        from ndtrain.engine.memory import retain_freed_memory
    except ImportError:
        try:
            from ndtrain.engine.transformer.fused import retain_freed_memory  # where it lived first
        except ImportError:
            return False
    _MEMORY_SET = bool(retain_freed_memory())
    return _MEMORY_SET


def write_run_files(out: str | Path, info, tokenizer=None) -> None:
    """DIR/task_info.json (and DIR/tokenizer.json for text tasks): with config.toml and the checkpoints the run
    directory alone rebuilds the model (launch/restore.py reads them first), even after the data is gone."""
    import json
    from ndtrain.launch.restore import TASK_INFO_FILE, TOKENIZER_FILE
    from ndtrain.launch.rundir import atomic_write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TASK_INFO_FILE, json.dumps(info.to_dict(), indent=1) + "\n")
    text = tokenizer.to_json() if tokenizer is not None else info.extra.get("tokenizer_json")
    if text:
        atomic_write_text(out / TOKENIZER_FILE, text)


def local_sink(cfg: Config, console=None, append: bool = False) -> MetricsSink:
    """Rank 0's sink when it writes the run directory itself: metrics.jsonl + summary.json, TensorBoard events
    (run.tensorboard; env NDTRAIN_TENSORBOARD=0 turns them off) and the console (launch/progress.py)."""
    writer = RunWriter(cfg.run.out, append=append)
    parts: list[MetricsSink] = [writer]
    if cfg.run.tensorboard and os.environ.get("NDTRAIN_TENSORBOARD", "1") != "0":
        from ndtrain.launch.progress import TensorBoardSink
        parts.append(TensorBoardSink(Path(cfg.run.out) / "tb"))
    if console is not None:
        parts.append(console)
    if len(parts) == 1:
        return writer
    from ndtrain.launch.progress import TeeSink
    return TeeSink(parts)


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
            if not hasattr(sink, "error"):
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
        self.comm.broadcast(self.store.data, root=0)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        run = self.cfg.run
        t_start = time.perf_counter()
        window_loss, window_count, window_t, window_steps = 0.0, 0.0, time.perf_counter(), 0
        last_record: dict = {}
        grad_norm = 0.0
        buf = np.zeros(2, dtype=np.float64)
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
                self._log(last_record)
                window_loss, window_count, window_t, window_steps = 0.0, 0.0, now, 0
            if run.eval_every and self.step % run.eval_every == 0 and self.step != run.steps:
                self._log({"step": self.step, "time": time.perf_counter() - t_start, "eval": self.evaluate()})
            if run.checkpoint_every and self.step % run.checkpoint_every == 0 and self.step != run.steps:
                self.save_checkpoint()

        final_eval = self.evaluate()
        wall = time.perf_counter() - t_start
        self._log({"step": self.step, "time": wall, "eval": final_eval})
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
        buf[0], buf[1] = loss_sum, count
        self.comm.allreduce(buf)  # global loss sum and count (every rank's share of batch k)
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
        rows = allgather_rows(self.comm, canonical_zeros(sums.ravel()))  # (W, 2 * M/W): rank order = mb order
        per_rank = rows.reshape(self.world, 2, len(block))
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
                    "data": [data_fingerprint(d) for d in (self.train_data, self.val_data)],
                    "task_info": self._task_info_record()}
            path = ckpt.save(self.ckpt_dir, self.step, self.store, buffers=dict(self.model.module.named_buffers()),
                             optim_state=optim_state, meta=meta, keep=self.cfg.run.keep_checkpoints)
        self.comm.barrier()
        return path
