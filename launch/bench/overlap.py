"""`ndtrain bench overlap`: the share of the training step spent waiting on communication, with bucketing (buckets
all-reduced while backward runs) and without (one all-reduce after backward), under MPI and Ray, on the S
transformer with 2 workers x 1 thread. The same interleaved jobs as `ndtrain bench scaling` (see there), without
the 1-worker runs.

    ndtrain bench overlap [--bucket-mb 1] [--steps 4] [--rounds 3] [--no-mpi] [--no-ray] [--json]
"""
from __future__ import annotations

import json

from ndtrain.launch.bench import scaling


def add_arguments(p) -> None:
    scaling.add_arguments(p)


def main(args) -> int:
    args.no_single = True
    result = {"config": args.config, "bucket_mb": args.bucket_mb, "note": "the machine is shared: figures are noisy"}
    for backend in ("mpi", "ray"):
        if not getattr(args, f"no_{backend}"):
            r = scaling._job(backend, args)
            result[backend] = {"transport": r.get("transport", "MPI"), "buckets": r["buckets"],
                               "grad_mb": r["grad_mb"],
                               **{m: r[m] for m in ("comm", "nobucket", "nocomm")},
                               "hidden_share": 1 - r["comm"]["comm_s"] / max(r["nobucket"]["comm_s"], 1e-12)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"communication share of the step, config {args.config}, 2 workers x 1 thread ({result['note']})")
    for backend in ("mpi", "ray"):
        r = result.get(backend)
        if r:
            print(f"  {backend} ({r['transport']}): bucketed ({r['buckets']} x <= {args.bucket_mb} MB) "
                  f"{100 * r['comm']['comm_share']:.1f}% ({r['comm']['comm_s'] * 1e3:.2f} ms)   one all-reduce after "
                  f"backward {100 * r['nobucket']['comm_share']:.1f}% ({r['nobucket']['comm_s'] * 1e3:.2f} ms)   "
                  f"-> {100 * r['hidden_share']:.0f}% of the wait hidden")
    return 0
