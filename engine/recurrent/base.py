"""What every recurrent direction shares: the weights (PyTorch's layout, transposed like Linear), the padding mask,
the time order, and the weight gradients taken as one GEMM after the time loop.

One `RecurrentDirection` is one layer running one way over time. Its contract:

    (out, final), backward = direction(x, lengths, state0, reverse)
        x: (B, T, D); lengths: (B,) int or None (all rows full); state0: tuple of (B, H) arrays or None (zeros)
        out: (B, T, H) (zero at padded steps); final: tuple of (B, H) arrays, the state after each row's last real
        step (h for RNN/GRU; h, c for LSTM)
    dx, dstate0 = backward(dout, dfinal)     dout (B, T, H) or None; dfinal a tuple whose entries may be None

Padding: step t of row b is real when t < lengths[b]. A padded step leaves the state unchanged and outputs zero, so
the final state equals running on the unpadded row alone. Running in `reverse`, the padded steps come first and
leave the initial state untouched, so the backward direction starts at each row's own last real token.

Weights: W_ih (D, G*H) and W_hh (H, G*H) are torch's weight_ih_l{k} / weight_hh_l{k} transposed, gate blocks in
torch's order (LSTM i, f, g, o; GRU r, z, n); b_ih and b_hh are torch's two biases. Init is torch's:
U(-1/sqrt(H), 1/sqrt(H)) for all four.
"""
from __future__ import annotations

import math

import numpy as np

from .. import init as initializers
from ..module import Module
from ..params import Param


class RecurrentDirection(Module):
    n_gates = 1
    n_state = 1  # arrays in the state tuple: 1 (h) or 2 (h, c)

    def __init__(self, d_in: int, hidden_size: int):
        super().__init__()
        self.d_in, self.hidden_size = d_in, hidden_size
        G, H = self.n_gates, hidden_size
        k = 1.0 / math.sqrt(H)
        u = initializers.uniform(-k, k)
        self.W_ih = Param((d_in, G * H), u, decay=True)
        self.W_hh = Param((H, G * H), u, decay=True)
        self.b_ih = Param((G * H,), u, decay=False)
        self.b_hh = Param((G * H,), u, decay=False)

    # -- shared pieces --------------------------------------------------------------------------------------------
    def _input_projection(self, x: np.ndarray) -> np.ndarray:
        """All time steps' x W_ih + b_ih as one GEMM, outside the time loop. x: (B, T, D) -> (B, T, G*H)."""
        B, T, D = x.shape
        if D != self.d_in:
            raise ValueError(f"{type(self).__name__} {self.path or ''}: input width {D}, expected {self.d_in}")
        xw = x.reshape(B * T, D) @ self.W_ih.data
        xw += self.b_ih.data
        return xw.reshape(B, T, -1)

    def _initial_state(self, state0, B: int, dtype) -> list[np.ndarray]:
        H = self.hidden_size
        if state0 is None:
            return [np.zeros((B, H), dtype) for _ in range(self.n_state)]
        out = []
        for s in state0:
            s = np.zeros((B, H), dtype) if s is None else np.asarray(s, dtype)
            if s.shape != (B, H):
                raise ValueError(f"{type(self).__name__} {self.path or ''}: initial state shape {s.shape}, "
                                 f"expected {(B, H)}")
            out.append(s.copy())
        return out

    def _final_grads(self, dfinal, B: int, dtype) -> list[np.ndarray]:
        """The backward's starting gradients of the n_state final states: fresh (B, H) copies of dfinal's entries,
        zeros where dfinal (or an entry of it) is None."""
        dfinal = (None,) * self.n_state if dfinal is None else dfinal
        H = self.hidden_size
        return [np.zeros((B, H), dtype) if d is None else np.array(d, dtype) for d in dfinal]

    @staticmethod
    def _mask(lengths, B: int, T: int, dtype):
        """(B, T, 1) with 1 at real steps, or None when every row is full (the fast path)."""
        if lengths is None:
            return None
        lengths = np.asarray(lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths shape {lengths.shape}, expected {(B,)}")
        if lengths.min() >= T:
            return None
        return (np.arange(T)[None, :] < lengths[:, None]).astype(dtype)[:, :, None]

    @staticmethod
    def _order(T: int, reverse: bool):
        return range(T - 1, -1, -1) if reverse else range(T)

    def _weight_grads(self, x, h_prev_all, dG_x, dG_h) -> np.ndarray:
        """After the time loop: dW_ih, db_ih, dW_hh, db_hh as single GEMMs / sums over all (B*T) steps; returns dx.
        x: (B, T, D); h_prev_all: (B, T, H) the state each step read; dG_x / dG_h: (B, T, G*H) gradients of the
        input-side and hidden-side pre-activations (equal except for GRU's n gate)."""
        B, T, D = x.shape
        GH = dG_x.shape[-1]
        gx = dG_x.reshape(B * T, GH)
        gh = gx if dG_h is dG_x else dG_h.reshape(B * T, GH)
        self.W_ih.grad += x.reshape(B * T, D).T @ gx
        db = gx.sum(axis=0)
        self.b_ih.grad += db
        self.W_hh.grad += h_prev_all.reshape(B * T, -1).T @ gh
        self.b_hh.grad += db if gh is gx else gh.sum(axis=0)
        return (gx @ self.W_ih.data.T).reshape(B, T, D)
