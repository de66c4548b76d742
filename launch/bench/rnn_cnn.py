"""Recurrent and convolutional layers vs PyTorch eager: ms per train step (forward + backward) of one layer.

Cases (float32, the same weights copied into torch):
  lstm     LSTM  B 64, T 32, D 128, H 256, 1 layer          torch.nn.LSTM(batch_first=True)
  gru      GRU   same sizes                                 torch.nn.GRU
  lstm-pad LSTM  as lstm, with lengths uniform in [T/2, T]  torch with pack_padded_sequence
  conv     Conv2d N 32, 64 -> 64 channels, 3x3 "same", 16x16 torch.nn.Conv2d
  cnn      the digits CNN ("cnn" model defaults), batch 64, forward + loss + backward
The backward takes a fixed random cotangent of the outputs (sum(out * c)). The two engines' steps are interleaved
(alternating which goes first) to cancel the machine's drift; min and median per step and the ratios ndtrain / torch
of the medians and of the minima are printed (target <= 1.5x at 1 thread). On a loaded machine the medians include
time slices lost to other processes: read the min as capability, or pass --clock cpu to time the process's CPU time
(time.process_time: immune to preemption, exact at 1 thread, where both engines compute in the calling thread).
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
from ndtrain.engine import ParamStore
from ndtrain.engine.recurrent import GRU, LSTM
from ndtrain.engine.conv import Conv2d
from ndtrain.data.info import TaskInfo
from ndtrain.launch.models import build_model
from threadpoolctl import threadpool_limits

CASES = ("lstm", "gru", "lstm-pad", "conv", "cnn")


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per case on stdout")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process_time (CPU seconds of this process; use at --threads 1 "
                        "on a loaded machine)")


def _rnn_case(name, torch, rng):
    B, T, D, H = 64, 32, 128, 256
    cls, tcls = (GRU, torch.nn.GRU) if name == "gru" else (LSTM, torch.nn.LSTM)
    m = cls(D, H)
    ParamStore.from_module(m, seed=0)
    tm = tcls(D, H, batch_first=True)
    cell = m.layers[0][0]
    with torch.no_grad():
        tm.weight_ih_l0.copy_(torch.from_numpy(cell.W_ih.data.T.copy()))
        tm.weight_hh_l0.copy_(torch.from_numpy(cell.W_hh.data.T.copy()))
        tm.bias_ih_l0.copy_(torch.from_numpy(cell.b_ih.data))
        tm.bias_hh_l0.copy_(torch.from_numpy(cell.b_hh.data))
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    dout = rng.standard_normal((B, T, H)).astype(np.float32)
    lengths = rng.integers(T // 2, T + 1, B) if name == "lstm-pad" else None
    if lengths is not None:
        lengths[0] = T
        dout *= (np.arange(T)[None, :] < lengths[:, None])[..., None]
    xt, dt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dout)

    def ours():
        ys, backward = m(x, lengths, train=True)
        backward(dout)
        return ys[0]

    def theirs():
        if lengths is None:
            out, _ = tm(xt)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=True,
                                                             enforce_sorted=False)
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(tm(packed)[0], batch_first=True, total_length=T)
        out.backward(dt)
        tm.zero_grad(set_to_none=False)
        xt.grad = None
        return out

    y0, y1 = ours(), theirs().detach().numpy()
    return ours, theirs, float(np.abs(y0 - y1).max())


def _conv_case(torch, rng):
    N, C, HW = 32, 64, 16
    m = Conv2d(C, C, 3, padding="same")
    ParamStore.from_module(m, seed=0)
    tm = torch.nn.Conv2d(C, C, 3, padding="same")
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(m.W.data))
        tm.bias.copy_(torch.from_numpy(m.b.data))
    x = rng.standard_normal((N, C, HW, HW)).astype(np.float32)
    dy = rng.standard_normal((N, C, HW, HW)).astype(np.float32)
    xt, dt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

    def ours():
        y, backward = m(x, train=True)
        backward(dy)
        return y

    def theirs():
        y = tm(xt)
        y.backward(dt)
        tm.zero_grad(set_to_none=False)
        xt.grad = None
        return y

    return ours, theirs, float(np.abs(ours() - theirs().detach().numpy()).max())


def _cnn_case(torch, rng):
    info = TaskInfo("digits", "classification", n_features=64, n_outputs=10)
    model = build_model("cnn", info, {})
    ParamStore.from_module(model.module, seed=0)
    nn = torch.nn
    tm = nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                       nn.Conv2d(1, 32, 3, padding="same"), nn.ReLU(), nn.Conv2d(32, 32, 3, padding="same"), nn.ReLU(),
                       nn.MaxPool2d(2),
                       nn.Conv2d(32, 64, 3, padding="same"), nn.ReLU(), nn.Conv2d(64, 64, 3, padding="same"), nn.ReLU(),
                       nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    x = rng.random((64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def ours():
        _, count, backward = model.loss({"x": x, "y": y}, train=True)
        backward(1.0 / count)

    def theirs():
        loss = nn.functional.cross_entropy(tm(xt), yt)
        loss.backward()
        tm.zero_grad(set_to_none=False)

    return ours, theirs, None


def _time(fn, clock=time.perf_counter) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def main(args) -> int:
    try:
        import torch  # torch: optional, the reference of the benchmark only
    except ImportError:
        print("ndtrain bench rnn_cnn: needs torch (the reference engine); pip install torch")
        return 1
    torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"ndtrain bench rnn_cnn: unknown case(s) {unknown}; known: {', '.join(CASES)}")
        return 2
    rng = np.random.default_rng(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if not args.json:
        print(f"threads {args.threads}; {args.steps} interleaved steps per engine; ms ({args.clock} clock) per "
              f"forward+backward step")
        print(f"{'case':10s} {'ndtrain min':>11s} {'ndtrain med':>11s} {'torch min':>10s} {'torch med':>10s} "
              f"{'ratio med':>9s} {'ratio min':>9s}  max|diff|")
    with threadpool_limits(args.threads, "blas"):
        for case in cases:
            if case == "conv":
                ours, theirs, diff = _conv_case(torch, rng)
            elif case == "cnn":
                ours, theirs, diff = _cnn_case(torch, rng)
            else:
                ours, theirs, diff = _rnn_case(case, torch, rng)
            for _ in range(args.warmup):
                ours(), theirs()
            t_ours, t_torch = [], []
            for i in range(args.steps):
                if i % 2:
                    t_torch.append(_time(theirs, clock))
                    t_ours.append(_time(ours, clock))
                else:
                    t_ours.append(_time(ours, clock))
                    t_torch.append(_time(theirs, clock))
            row = {"case": case, "threads": args.threads, "clock": args.clock, "ndtrain_ms_min": min(t_ours),
                   "ndtrain_ms_median": statistics.median(t_ours), "torch_ms_min": min(t_torch),
                   "torch_ms_median": statistics.median(t_torch), "max_abs_diff": diff}
            row["ratio_median"] = row["ndtrain_ms_median"] / row["torch_ms_median"]
            row["ratio_min"] = row["ndtrain_ms_min"] / row["torch_ms_min"]
            if args.json:
                print(json.dumps(row))
            else:
                d = "-" if diff is None else f"{diff:.1e}"
                print(f"{case:10s} {row['ndtrain_ms_min']:11.2f} {row['ndtrain_ms_median']:11.2f} "
                      f"{row['torch_ms_min']:10.2f} {row['torch_ms_median']:10.2f} {row['ratio_median']:8.2f}x "
                      f"{row['ratio_min']:8.2f}x  {d}",
                      flush=True)
    return 0
