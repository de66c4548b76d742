"""Multi-layer, optionally bidirectional stacks of one recurrent direction type (RNN, GRU, LSTM), torch's API:

    (out, h_n), backward = gru(x, lengths, h0)              RNN / GRU
    (out, h_n, c_n), backward = lstm(x, lengths, h0, c0)    LSTM
        x: (B, T, D); lengths: (B,) or None; h0, c0: (L*dirs, B, H) or None (zeros)
        out: (B, T, dirs*H) the last layer's outputs (forward half first), zero at padded steps
        h_n, c_n: (L*dirs, B, H), entry l*dirs + d is layer l, direction d (0 forward, 1 backward), as in torch
    backward(dout, dh_n=None, dc_n=None) -> dx, or (dx, None, dh0[, dc0]) when an initial state was passed
        (one entry per forward input, so the gradient checker can test the initial state too)

Layer l > 0 reads the concatenation of layer l-1's directions. No dropout between layers (not in the brief).
"""
from __future__ import annotations

import numpy as np

from ..module import Module, ModuleList


class RecurrentStack(Module):
    direction_cls = None  # a RecurrentDirection subclass

    def __init__(self, d_in: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be >= 1, got {num_layers}")
        self.d_in, self.hidden_size, self.num_layers = d_in, hidden_size, num_layers
        self.bidirectional = bidirectional
        self.n_dirs = 2 if bidirectional else 1
        self.layers = ModuleList()
        for layer in range(num_layers):
            width = d_in if layer == 0 else self.n_dirs * hidden_size
            self.layers.append(ModuleList([self.direction_cls(width, hidden_size) for _ in range(self.n_dirs)]))

    @property
    def n_state(self) -> int:
        return self.direction_cls.n_state

    def forward(self, x, lengths=None, h0=None, c0=None, *, train: bool):
        L, nd, H = self.num_layers, self.n_dirs, self.hidden_size
        given = [h0, c0][:self.n_state]
        has_state = any(s is not None for s in given)
        inp = x
        finals, backwards = [], []  # per (layer, direction), in torch's l*dirs + d order
        for l, dirs in enumerate(self.layers):
            outs = []
            for d, cell in enumerate(dirs):
                k = l * nd + d
                state0 = tuple(None if s is None else s[k] for s in given) if has_state else None
                (o, fin), bwd = cell(inp, lengths, state0, d == 1, train=train)
                outs.append(o)
                finals.append(fin)
                backwards.append(bwd)
            inp = outs[0] if nd == 1 else np.concatenate(outs, axis=-1)  # (B, T, dirs*H)
        out = inp
        states = tuple(np.stack([f[j] for f in finals]) for j in range(self.n_state))  # each (L*dirs, B, H)

        def backward(dout=None, dh_n=None, dc_n=None):
            dfin = [dh_n, dc_n][:self.n_state]
            dstate0 = [[None] * (L * nd) for _ in range(self.n_state)]
            dy = dout
            for l in range(L - 1, -1, -1):
                dx = None
                for d in range(nd):
                    k = l * nd + d
                    dy_d = None if dy is None else (dy if nd == 1 else dy[..., d * H:(d + 1) * H])
                    dx_d, ds = backwards[k](dy_d, tuple(None if s is None else s[k] for s in dfin))
                    dx = dx_d if dx is None else dx + dx_d
                    for j in range(self.n_state):
                        dstate0[j][k] = ds[j]
                dy = dx
            if not has_state:
                return dy
            return (dy, None) + tuple(np.stack(ds) for ds in dstate0)

        return (out,) + states, backward
