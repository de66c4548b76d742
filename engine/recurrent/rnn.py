"""Elman RNN with tanh, torch's formulation: h' = tanh(x W_ih + b_ih + h W_hh + b_hh).

The plain recurrence shows the vanishing gradient: BPTT multiplies by W_hh^T diag(1 - h'^2) once per step.
"""
from __future__ import annotations

import numpy as np

from .base import RecurrentDirection
from .stack import RecurrentStack


class RNNDirection(RecurrentDirection):
    n_gates = 1
    n_state = 1

    def forward(self, x, lengths=None, state0=None, reverse: bool = False, *, train: bool):
        dtype = self.W_hh.data.dtype
        x = np.asarray(x, dtype)
        B, T, _ = x.shape
        H = self.hidden_size
        W_hh = self.W_hh.data
        acts = self._input_projection(x)  # (B, T, H): pre-activations, then h' in place
        acts += self.b_hh.data
        m = self._mask(lengths, B, T, dtype)
        (h,) = self._initial_state(state0, B, dtype)
        out = np.empty((B, T, H), dtype)
        h_prev_all = np.empty((B, T, H), dtype)
        for t in self._order(T, reverse):
            h_prev_all[:, t] = h
            a = acts[:, t]
            a += h @ W_hh
            np.tanh(a, out=a)
            if m is None:
                h = a
                out[:, t] = a
            else:
                mt = m[:, t]
                h = h + mt * (a - h)
                out[:, t] = a * mt

        def backward(dout=None, dfinal=None):
            (dh,) = self._final_grads(dfinal, B, dtype)
            dG = np.empty((B, T, H), dtype)
            W_hhT = W_hh.T
            for t in self._order(T, not reverse):
                dhn = dh if dout is None else dh + dout[:, t]
                if m is not None:
                    mt = m[:, t]
                    dh_keep = dh * (1.0 - mt)
                    dhn = dhn * mt
                a = acts[:, t]
                d = dG[:, t]
                np.multiply(a, a, out=d)
                np.subtract(1.0, d, out=d)
                d *= dhn
                dh = d @ W_hhT
                if m is not None:
                    dh += dh_keep
            dx = self._weight_grads(x, h_prev_all, dG, dG)
            return dx, (dh,)

        return (out, (h,)), backward


class RNN(RecurrentStack):
    """x: (B, T, D) -> (out (B, T, dirs*H), h_n (L*dirs, B, H)); see RecurrentStack."""
    direction_cls = RNNDirection
