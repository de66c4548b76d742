"""`ndtrain average`: the parameter average of a run's last N checkpoints (fairseq's average_checkpoints.py).

    ndtrain average --run runs/m30k --last 5                 # -> runs/m30k/checkpoints/avg.json (+ avg.npz)
    ndtrain eval --run runs/m30k --checkpoint avg --beam 5    # evaluate it
    ndtrain generate --run runs/m30k --checkpoint avg --beam 5 --input en.txt

Every parameter (and module buffer) becomes the arithmetic mean of its values in the N newest checkpoints
(ckpt-*.json), accumulated in float64 and stored in the checkpoints' dtype. Each input must pass its sha256
checks and all must share one parameter layout. The result is a checkpoint of its own (same format, written
atomically, record hash included) named avg (or --out FILE): it keeps the newest input's step, config and task
records, holds no optimizer or loader state, and is never picked up by automatic resume or pruning.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch import rundir
from ndtrain.launch.errors import UsageError
from ndtrain.launch.restore import check_run_dir

AVG_NAME = "avg"
# The checkpoint-format fields save() writes itself; the rest of the newest input's record is carried over.
_FORMAT_FIELDS = ("format", "step", "npz", "sha256", "dtype", "param_layout", "buffer_layout", "optim_layout",
                  "optim_scalars", "record_sha256")
# Resume state that does not describe an average (its optimizer moments and data position belong to one step).
_DROPPED = ("loader", "rng", "schedule_step", "param_checksum", "skipped_steps")


def add_parser(sub) -> None:
    p = sub.add_parser("average", help="average the parameters of a run's last N checkpoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (written by ndtrain train)")
    p.add_argument("--last", required=True, type=int, metavar="N", help="how many of the newest checkpoints")
    p.add_argument("--out", metavar="FILE", help=f"checkpoint JSON to write (default DIR/checkpoints/{AVG_NAME}.json)")
    p.set_defaults(func=main)


class _Averaged:
    """What cluster.checkpoint.save reads from a ParamStore: params (name -> .data), dtype, layout()."""

    def __init__(self, params: dict[str, np.ndarray], dtype, layout: list):
        self.params = {n: type("P", (), {"data": a})() for n, a in params.items()}
        self.dtype = np.dtype(dtype)
        self._layout = layout

    def layout(self) -> list:
        return self._layout


def mean_arrays(dicts: list[dict[str, np.ndarray]], what: str, source) -> dict[str, np.ndarray]:
    """Element-wise mean of same-keyed, same-shaped arrays (float64 sums, cast back); an integer array keeps the
    newest value. A mismatch raises UsageError naming the checkpoint (`source[i]`)."""
    keys = set(dicts[-1])
    out = {}
    for i, d in enumerate(dicts):
        if set(d) != keys:
            diff = sorted(set(d) ^ keys)[:3]
            raise UsageError(f"{source[i]}: its {what}s differ from {source[-1]}'s ({diff}): not the same model")
    for k in sorted(keys):
        newest = dicts[-1][k]
        for i, d in enumerate(dicts):
            if d[k].shape != newest.shape:
                raise UsageError(f"{source[i]}: {what} {k!r} has shape {d[k].shape}, {source[-1]} has {newest.shape}")
        if not np.issubdtype(newest.dtype, np.floating):
            out[k] = newest.copy()
            continue
        acc = np.zeros(newest.shape, dtype=np.float64)
        for d in dicts:
            acc += d[k]
        acc /= len(dicts)
        out[k] = acc.astype(newest.dtype)
    return out


def average(run_dir: str | Path, last: int, out: str | Path | None = None) -> Path:
    """Write the average of run_dir's `last` newest checkpoints; returns the written JSON's path."""
    if last < 1:
        raise UsageError(f"--last: must be >= 1, got {last}")
    d = check_run_dir(run_dir)
    found = ckpt.list_checkpoints(rundir.checkpoints_dir(d))
    if len(found) < last:
        raise UsageError(f"{rundir.checkpoints_dir(d)}: --last {last} asks for more checkpoints than the {len(found)} there "
                         f"(run.keep_checkpoints keeps the newest; raise it to average more)")
    paths = found[-last:]
    loaded = []
    for p in paths:
        try:
            loaded.append(ckpt.load(p))
        except ckpt.CheckpointError as e:
            raise UsageError(str(e)) from None
    names = [p.name for p in paths]
    params = mean_arrays([c.params for c in loaded], "parameter", names)
    buffers = mean_arrays([c.buffers for c in loaded], "buffer", names)
    newest = loaded[-1]
    meta = {k: v for k, v in newest.meta.items() if k not in _FORMAT_FIELDS + _DROPPED}
    meta["averaged"] = {"files": names, "steps": [c.step for c in loaded]}
    if out is None:
        target_dir, name = rundir.checkpoints_dir(d), AVG_NAME
    else:
        out = Path(out)
        if out.suffix != ".json":
            raise UsageError(f"--out: {out}: give the checkpoint's JSON path (FILE.json; FILE.npz goes beside it)")
        if out.name.startswith("ckpt-"):
            raise UsageError(f"--out: {out}: ckpt-* names are the run's own checkpoints; choose another name")
        target_dir, name = out.parent, out.stem
    store = _Averaged(params, newest.meta.get("dtype") or next(iter(params.values())).dtype,
                      newest.meta["param_layout"])
    return ckpt.save(target_dir, newest.step, store, buffers=buffers, meta=meta, name=name)


def main(args) -> int:
    path = average(args.run, args.last, args.out)
    print(f"averaged {args.last} checkpoint(s) of {args.run} -> {path}")
    return 0


__all__ = ["average", "mean_arrays", "add_parser", "main", "AVG_NAME"]
