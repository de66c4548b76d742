"""The training loop, written once against the Communicator: the same code runs local, under MPI and under Ray.

Per step (GUIDE §1):
    batch (this rank's share of global batch k) -> TaskModel.loss -> [loss_sum, count] all-reduced
    -> backward(1 / global_count) (GradReducer all-reduces bucket by bucket when world_size > 1)
    -> clip by global norm -> optimizer.step(lr(step)) -> metrics (rank 0 -> the sink)
Every rank holds the same parameters after every step: same start (rank 0's broadcast), same summed gradient,
same optimizer arithmetic. Evaluation splits the validation rows across ranks and sums exact statistics.

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
            train, val = nd.open_dataset(root / TRAIN_DIR), nd.open_dataset(root / VAL_DIR)
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
    """This rank's share of every global batch (ndtrain.data.loader.Loader: order from (seed, epoch) only)."""
    from ndtrain.data.loader import Loader
    try:
        return Loader(dataset, cfg.run.batch_size, rank, world, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(f"run.batch_size: {e}") from None


def eval_batches(dataset, cfg: Config, rank: int, world: int):
    """Rank r's share of ALL validation rows (every row once, none dropped; a share may be short or empty)."""
    from ndtrain.data.loader import Loader
    loader = Loader.for_eval(dataset, cfg.run.eval_batch_size * world, rank, world)
    for batch in loader:
        if len(next(iter(batch.values()))):
            yield batch


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


def run_worker(cfg: Config, comm: Communicator, sink: MetricsSink | None = None, *, write_config: bool = False,
               verbose: bool = False) -> dict:
    """Train per cfg on this rank. Returns the summary (on every rank).

    The model, data and optimizer are built (and so every config error raised) before anything is written.
    sink: where rank 0's records go (default: a RunWriter on run.out for rank 0, nothing for the others).
    write_config: rank 0 writes run.out/config.toml (the local backend; the coordinator does it otherwise).
    Any exception is logged to the sink (with rank and step) and re-raised: a worker never swallows an error."""
    from threadpoolctl import threadpool_limits
    threads = cfg.run.threads or default_threads(cfg.run.workers)
    with threadpool_limits(limits=threads, user_api="blas"):
        trainer = Trainer(cfg, comm, NullSink())
        own_sink = sink is None
        if own_sink:
            sink = RunWriter(cfg.run.out, append=bool(cfg.run.resume)) if comm.rank == 0 else NullSink()
        if write_config and comm.rank == 0:
            write_config_file(cfg, Path(cfg.run.out) / "config.toml")
        trainer.sink, trainer.verbose = sink, verbose
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
        if self.world > 1:
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
        try:
            c = ckpt.load(path)
            ckpt.restore(c, self.store, self.model.module)
            if hasattr(self.optimizer, "load_state_dict"):
                self.optimizer.load_state_dict(c.optim)
            self.loader.load_state_dict(c.meta["loader"])
        except (ckpt.CheckpointError, KeyError, ValueError) as e:
            raise ConfigError(f"run.resume: {e}") from None
        ckpt.set_rng_states(self.model.module, c.meta.get("rng", {}).get(str(self.rank), {}))
        self.step = int(c.step)
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
            if self.reducer is not None:
                self.reducer.begin(sync=True)
            self.store.zero_grad()
            loss_sum, count, backward = self.model.loss(batch, train=True)
            buf[0], buf[1] = loss_sum, count
            self.comm.allreduce(buf)  # global loss sum and count (every rank's share of batch k)
            if buf[1] <= 0:
                raise WorkerError(f"rank {self.rank}, step {step}: the global batch has no targets to learn from")
            if not math.isfinite(buf[0]):
                raise WorkerError(f"rank {self.rank}, step {step}: loss is {buf[0] / buf[1]} (non-finite); "
                                  f"lower optim.lr or set optim.grad_clip")
            backward(1.0 / buf[1])
            if self.reducer is not None:
                self.reducer.finish()  # store.grad now holds the gradient of the global mean loss
            grad_norm = self._clip()
            lr = self.lr_at(step)
            self.optimizer.step(lr)
            self.step = step + 1
            window_loss += buf[0]
            window_count += buf[1]
            window_steps += 1

            if self.step % run.log_every == 0 or self.step == run.steps:
                now = time.perf_counter()
                dt = now - window_t
                last_record = {"step": self.step, "loss": window_loss / window_count, "lr": lr,
                               "time": now - t_start, "grad_norm": grad_norm,
                               "tokens_per_s": window_count / dt if dt > 0 else 0.0,
                               "step_time": dt / window_steps}
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
                   "param_checksum": self.store.checksum(), "config_hash": config_hash(self.cfg)}
        if self.rank == 0:
            self.sink.summary(summary)
        return summary

    def _clip(self) -> float:
        from ndtrain.engine.clip import clip_grad_norm, grad_sq_norm
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            norm = clip_grad_norm(self.store.grad, clip)
        else:
            norm = math.sqrt(grad_sq_norm(self.store.grad))
        if not math.isfinite(norm):
            raise WorkerError(f"rank {self.rank}, step {self.step}: gradient norm is {norm} (non-finite)")
        return norm

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.sink.log(record)
            if self.verbose:
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
                    "param_checksum": self.store.checksum()}
            path = ckpt.save(self.ckpt_dir, self.step, self.store, buffers=dict(self.model.module.named_buffers()),
                             optim_state=optim_state, meta=meta, keep=self.cfg.run.keep_checkpoints)
        self.comm.barrier()
        return path
