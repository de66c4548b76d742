"""LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000), torch's formulation:

    i, f, g, o = sigma(a_i), sigma(a_f), tanh(a_g), sigma(a_o)      a = x W_ih + b_ih + h W_hh + b_hh   (B, 4H)
    c' = f * c + i * g          h' = o * tanh(c')

BPTT by hand: the time loop holds only the recurrent GEMM (h W_hh forward, dG W_hh^T backward); the input
projection and every weight gradient are single GEMMs over all B*T steps (see base.py).
"""
from __future__ import annotations

import numpy as np

from .base import RecurrentDirection
from .stack import RecurrentStack


def _gate_vectors(H: int, dtype):
    """Per-column constants so one tanh covers all four gates: sigma(a) = 0.5 tanh(0.5 a) + 0.5.
    act = tanh(a * scale) * scale + shift; its derivative, from the activation itself, is c0 + act * (c1 - act)."""
    half, one, zero = np.full(H, 0.5), np.ones(H), np.zeros(H)
    scale = np.concatenate([half, half, one, half]).astype(dtype)
    shift = np.concatenate([half, half, zero, half]).astype(dtype)
    c0 = np.concatenate([zero, zero, one, zero]).astype(dtype)  # tanh: 1 - g^2;  sigmoid: s - s^2
    c1 = np.concatenate([one, one, zero, one]).astype(dtype)
    return scale, shift, c0, c1


def _shift(states: np.ndarray, first: np.ndarray, reverse: bool) -> np.ndarray:
    """states (B, T, H) after each step -> the state before each step, `first` (B, H) at the first step."""
    prev = np.empty_like(states)
    if reverse:
        prev[:, :-1] = states[:, 1:]
        prev[:, -1] = first
    else:
        prev[:, 1:] = states[:, :-1]
        prev[:, 0] = first
    return prev


class LSTMDirection(RecurrentDirection):
    n_gates = 4
    n_state = 2

    def forward(self, x, lengths=None, state0=None, reverse: bool = False, *, train: bool):
        dtype = self.W_hh.data.dtype
        x = np.asarray(x, dtype)
        B, T, _ = x.shape
        H = self.hidden_size
        W_hh = self.W_hh.data
        scale, shift, c0, c1 = _gate_vectors(H, dtype)
        # The sigmoid's 1/2 is folded into the weights once, so a step needs one tanh and one affine map.
        W_hh_s = W_hh * scale
        acts = self._input_projection(x)  # (B, T, 4H): pre-activations now, activations after the loop body
        acts += self.b_hh.data
        acts *= scale
        m = self._mask(lengths, B, T, dtype)  # (B, T, 1) or None
        h, c = self._initial_state(state0, B, dtype)
        out = np.empty((B, T, H), dtype)
        c_all = np.empty((B, T, H), dtype)  # the cell state after each step
        tanh_c_all = np.empty((B, T, H), dtype)
        h_prev_all = None if m is None else np.empty((B, T, H), dtype)  # the h each step read (for dW_hh)
        h0, c_init = h, c
        for t in self._order(T, reverse):
            a = acts[:, t]  # (B, 4H) view
            a += h @ W_hh_s
            np.tanh(a, out=a)
            a *= scale
            a += shift
            i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            c_new = f * c
            c_new += i * g
            tc = np.tanh(c_new)
            tanh_c_all[:, t] = tc
            h_new = o * tc
            if m is None:
                h, c = h_new, c_new
                out[:, t] = h_new
            else:
                h_prev_all[:, t] = h
                mt = m[:, t]  # (B, 1)
                h = h + mt * (h_new - h)
                c = c + mt * (c_new - c)
                out[:, t] = h_new * mt
            c_all[:, t] = c
        # What each step read: the state after the step before it (h0 / c0 first); without padding, h is `out`.
        c_prev_all = _shift(c_all, c_init, reverse)
        if h_prev_all is None:
            h_prev_all = _shift(out, h0, reverse)

        def backward(dout=None, dfinal=None):
            dh, dc = self._final_grads(dfinal, B, dtype)
            dG = np.empty((B, T, 4 * H), dtype)
            W_hhT = W_hh.T
            for t in self._order(T, not reverse):
                dhn = dh if dout is None else dh + dout[:, t]  # gradient reaching this step's new h
                dcn = dc
                if m is not None:
                    mt = m[:, t]
                    keep = 1.0 - mt  # padded step: the state passes through untouched
                    dh_keep, dc_keep = dh * keep, dc * keep
                    dhn = dhn * mt
                    dcn = dc * mt
                a = acts[:, t]
                i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                tc = tanh_c_all[:, t]
                dcn = dcn + dhn * o * (1.0 - tc * tc)
                d = dG[:, t]  # (B, 4H): upstream gradient of each activation, then times its derivative
                np.multiply(dcn, g, out=d[:, :H])
                np.multiply(dcn, c_prev_all[:, t], out=d[:, H:2 * H])
                np.multiply(dcn, i, out=d[:, 2 * H:3 * H])
                np.multiply(dhn, tc, out=d[:, 3 * H:])
                d *= c0 + a * (c1 - a)
                dc = dcn * f
                dh = d @ W_hhT
                if m is not None:
                    dh += dh_keep
                    dc += dc_keep
            dx = self._weight_grads(x, h_prev_all, dG, dG)
            return dx, (dh, dc)

        return (out, (h, c)), backward


class LSTM(RecurrentStack):
    """x: (B, T, D) -> (out (B, T, dirs*H), h_n (L*dirs, B, H), c_n (L*dirs, B, H)); see RecurrentStack."""
    direction_cls = LSTMDirection
