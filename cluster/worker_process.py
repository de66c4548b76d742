"""The worker process around the training loop: BLAS threads per rank, glibc memory retention (once per
process), the run files that make a run directory self-contained, and rank 0's sink when it writes the run
directory itself (the local backend).
"""
from __future__ import annotations

import os
from pathlib import Path

from ndtrain.launch.config import Config
from ndtrain.launch.rundir import MetricsSink, RunWriter


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
    unavailable (not glibc)."""
    global _MEMORY_SET
    if _MEMORY_SET:
        return True
    from ndtrain.engine.memory import retain_freed_memory  # looked up per call: tests replace it
    _MEMORY_SET = bool(retain_freed_memory())
    return _MEMORY_SET


def write_run_files(out: str | Path, info, tokenizer=None) -> None:
    """DIR/task_info.json (and DIR/tokenizer.json for text tasks): with config.toml and the checkpoints the run
    directory alone rebuilds the model (launch/restore.py reads them first), even after the data is gone."""
    import json
    from ndtrain.launch.restore import TASK_INFO_FILE, TOKENIZER_FILE
    from ndtrain.data.atomic import atomic_write_text
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
