"""`ndtrain bench allreduce`: the ndtrain MPI path (MPICommunicator: chunked in-place Allreduce) against raw mpi4py
`Allreduce(IN_PLACE, buf)` on the same buffers, interleaved in one run and reported as a ratio (raw time / ndtrain
time: >= 1 means ndtrain is at least as fast); then the Ray path (RayCommunicator over shared memory or TCP).

    ndtrain bench allreduce [--sizes 4K,256K,4M,32M,128M] [--workers 2] [--no-ray] [--json]

Times are the minimum over repetitions, each preceded by a barrier, max over ranks; float32 buffers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from ndtrain.launch import rundir
from ndtrain.cluster.comm.mpi import MPICommunicator
from ndtrain.launch.launch_mpi import find_mpiexec, mpi_flavour
from ndtrain.launch.launch_ray import run_ray
import numpy as np

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def fmt_size(n: int) -> str:
    for unit, k in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}B"
    return f"{n} B"


def reps_for(nbytes: int) -> int:
    return max(3, min(200, int(64 * (1 << 20) // max(nbytes, 1))))


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="4K,256K,4M,32M,128M", help="comma-separated buffer sizes (bytes, K, M)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-mb", type=float, default=8.0, help="MPICommunicator chunk size")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray path")
    p.add_argument("--no-mpi", action="store_true", help="skip the MPI paths")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


# -- inside the ranks ----------------------------------------------------------------------------------------------
def _time_min(comm_barrier, fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        comm_barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mpi_rank(sizes: list[int], chunk_bytes: int, out: str) -> None:
    from mpi4py import MPI  # mpi4py: importing it initialises MPI, which only MPI ranks may do

    comm = MPICommunicator(chunk_bytes=chunk_bytes)
    raw = comm.comm
    rows = []
    for nbytes in sizes:
        buf = np.zeros(nbytes // 4, np.float32)  # zeros: repeated in-place sums stay finite
        reps = reps_for(nbytes)
        raw_t, nd_t = float("inf"), float("inf")
        for _ in range(3):  # interleave the two paths: drifts of this machine hit both alike
            raw_t = min(raw_t, _time_min(raw.Barrier, lambda: raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                                         max(1, reps // 3)))
            nd_t = min(nd_t, _time_min(raw.Barrier, lambda: comm.allreduce(buf), max(1, reps // 3)))
        raw_t = raw.allreduce(raw_t, op=MPI.MAX)
        nd_t = raw.allreduce(nd_t, op=MPI.MAX)
        rows.append({"bytes": nbytes, "raw_mpi_s": raw_t, "ndtrain_mpi_s": nd_t, "ratio": raw_t / nd_t})
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def ray_rank(ctx) -> None:
    comm = ctx.comm
    rows = []
    for nbytes in ctx.args["sizes"]:
        buf = np.zeros(nbytes // 4, np.float32)  # zeros: repeated in-place sums stay finite
        t = _time_min(comm.barrier, lambda: comm.allreduce(buf), reps_for(nbytes))
        t = max(comm.allgather_obj(t))
        rows.append({"bytes": nbytes, "ray_s": t})
    if ctx.rank == 0:
        with open(ctx.args["out"], "w") as f:
            json.dump(rows, f)


# -- driver ----------------------------------------------------------------------------------------------------------
def run_mpi_part(sizes, workers, chunk_bytes) -> list[dict]:
    mpiexec = find_mpiexec()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "mpi.json")
        cmd = [mpiexec, "-n", str(workers)]
        if mpi_flavour(mpiexec) == "openmpi":
            cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        cmd += [sys.executable, "-c", "import sys, json; from ndtrain.launch.bench.allreduce import mpi_rank; "
                "mpi_rank(json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3])", json.dumps(sizes),
                str(chunk_bytes), out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, timeout=1800)
        with open(out) as f:
            return json.load(f)


def run_ray_part(sizes, workers) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ray.json")
        rc = run_ray("ndtrain.launch.bench.allreduce:ray_rank", {"sizes": sizes, "out": out}, workers=workers,
                     run_dir=d, threads=1)
        if rc != 0:
            raise RuntimeError("the Ray all-reduce benchmark failed (see above)")
        with open(out) as f:
            rows = json.load(f)
        with open(os.path.join(d, rundir.TOPOLOGY)) as f:
            transport = json.load(f).get("transport", "")
    return rows, transport


def main(args) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    result: dict = {"workers": args.workers, "dtype": "float32", "rows": {n: {"bytes": n} for n in sizes}}
    if not args.no_mpi:
        for r in run_mpi_part(sizes, args.workers, int(args.chunk_mb * (1 << 20))):
            result["rows"][r["bytes"]].update(r)
    if not args.no_ray:
        rows, transport = run_ray_part(sizes, args.workers)
        result["ray_transport"] = transport
        for r in rows:
            result["rows"][r["bytes"]].update(r)
    rows = list(result["rows"].values())
    for r in rows:
        for key in ("raw_mpi_s", "ndtrain_mpi_s", "ray_s"):
            if key in r:
                r[key.replace("_s", "_gbps")] = r["bytes"] / r[key] / 1e9
        if "ray_s" in r and "raw_mpi_s" in r:
            r["ray_vs_raw"] = r["raw_mpi_s"] / r["ray_s"]
    result["rows"] = rows
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"all-reduce, {args.workers} ranks, float32, min time (algbw GB/s); ratio = raw time / ndtrain time")
    print(f"{'size':>8} | {'raw mpi4py':>18} | {'ndtrain MPI':>18} | {'ratio':>6} | "
          f"{'ndtrain Ray (' + result.get('ray_transport', '-') + ')':>22} | {'vs raw':>6}")
    for r in rows:
        def cell(k):
            return f"{r[k] * 1e3:9.3f} ms ({r[k.replace('_s', '_gbps')]:5.2f})" if k in r else f"{'-':>18}"
        print(f"{fmt_size(r['bytes']):>8} | {cell('raw_mpi_s')} | {cell('ndtrain_mpi_s')} | "
              f"{r.get('ratio', float('nan')):6.2f} | {cell('ray_s'):>22} | {r.get('ray_vs_raw', float('nan')):6.2f}")
    return 0
