"""The process a rank runs in: how many BLAS threads it gets (one rule for every backend) and glibc memory
retention (once per process).

    threads = default_threads(workers_on_host)    # $OPENBLAS/OMP/MKL_NUM_THREADS if set, else cores // workers
    pin_threads(threads)                          # env for libraries not loaded yet + threadpoolctl for loaded ones
"""
from __future__ import annotations

import os

import threadpoolctl

from ndtrain.engine import memory

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_threads(workers_on_host: int) -> int:
    """BLAS threads per worker when none are configured: OPENBLAS/OMP/MKL_NUM_THREADS if the user set one, else
    this host's cores // the workers on it."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_host))


def pin_threads(n: int) -> None:
    """Limit BLAS/OpenMP threads of this process to n (env for libraries not loaded yet, threadpoolctl for those
    that are)."""
    n = max(1, int(n))
    for k in THREAD_ENV:
        os.environ[k] = str(n)
    threadpoolctl.threadpool_limits(n)


_MEMORY_SET = False


def set_up_process_memory() -> bool:
    """Once per worker process: glibc keeps freed memory for reuse, so steady-state steps do not page-fault through
    their activations again (engine.memory.retain_freed_memory, looked up per call; measured tens of ms per step). False where it is
    unavailable (not glibc)."""
    global _MEMORY_SET
    if _MEMORY_SET:
        return True
    _MEMORY_SET = bool(memory.retain_freed_memory())
    return _MEMORY_SET
