"""GRU (Cho et al. 2014), torch's formulation (the reset gate multiplies the hidden projection *with* its bias):

    r = sigma(x W_ir + b_ir + h W_hr + b_hr)      z = sigma(x W_iz + b_iz + h W_hz + b_hz)
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn))  h' = (1 - z) * n + z * h

Gate blocks r, z, n in W_ih (D, 3H) and W_hh (H, 3H). Because of r * (h W_hn + b_hn) the input-side and
hidden-side pre-activation gradients differ in the n block: dG_x[n] = da_n, dG_h[n] = da_n * r.
"""
from __future__ import annotations

import numpy as np

from .base import RecurrentDirection
from .stack import RecurrentStack


class GRUDirection(RecurrentDirection):
    n_gates = 3
    n_state = 1

    def forward(self, x, lengths=None, state0=None, reverse: bool = False, *, train: bool):
        dtype = self.W_hh.data.dtype
        x = np.asarray(x, dtype)
        B, T, _ = x.shape
        H = self.hidden_size
        W_hh, b_hn = self.W_hh.data, self.b_hh.data[2 * H:]
        acts = self._input_projection(x)  # (B, T, 3H): pre-activations, then (r, z, n) in place
        acts[..., :2 * H] += self.b_hh.data[:2 * H]  # b_hr, b_hz add like input biases; b_hn does not
        m = self._mask(lengths, B, T, dtype)
        (h,) = self._initial_state(state0, B, dtype)
        out = np.empty((B, T, H), dtype)
        h_prev_all = np.empty((B, T, H), dtype)
        hn_all = np.empty((B, T, H), dtype)  # h W_hn + b_hn, needed for dr
        for t in self._order(T, reverse):
            h_prev_all[:, t] = h
            a = acts[:, t]
            hw = h @ W_hh  # (B, 3H)
            rz = a[:, :2 * H]
            rz += hw[:, :2 * H]
            rz *= 0.5  # sigma(v) = 0.5 tanh(v / 2) + 0.5
            np.tanh(rz, out=rz)
            rz *= 0.5
            rz += 0.5
            r, z = a[:, :H], a[:, H:2 * H]
            hn = hw[:, 2 * H:]
            hn += b_hn
            hn_all[:, t] = hn
            n = a[:, 2 * H:]
            n += r * hn
            np.tanh(n, out=n)
            h_new = h - n
            h_new *= z
            h_new += n
            if m is None:
                h = h_new
                out[:, t] = h_new
            else:
                mt = m[:, t]
                h = h + mt * (h_new - h)
                out[:, t] = h_new * mt

        def backward(dout=None, dfinal=None):
            (dh,) = self._final_grads(dfinal, B, dtype)
            dG_x = np.empty((B, T, 3 * H), dtype)
            dG_h = np.empty((B, T, 3 * H), dtype)
            W_hhT = W_hh.T
            for t in self._order(T, not reverse):
                dhn = dh if dout is None else dh + dout[:, t]
                if m is not None:
                    mt = m[:, t]
                    dh_keep = dh * (1.0 - mt)
                    dhn = dhn * mt
                a = acts[:, t]
                r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
                hp = h_prev_all[:, t]
                gx, gh = dG_x[:, t], dG_h[:, t]
                dan = gx[:, 2 * H:]
                np.multiply(dhn, 1.0 - z, out=dan)
                dan *= 1.0 - n * n
                np.multiply(dan * hn_all[:, t], r * (1.0 - r), out=gx[:, :H])
                np.multiply(dhn * (hp - n), z * (1.0 - z), out=gx[:, H:2 * H])
                gh[:, :2 * H] = gx[:, :2 * H]
                np.multiply(dan, r, out=gh[:, 2 * H:])
                dh_direct = dhn * z
                dh = gh @ W_hhT
                dh += dh_direct
                if m is not None:
                    dh += dh_keep
            dx = self._weight_grads(x, h_prev_all, dG_x, dG_h)
            return dx, (dh,)

        return (out, (h,)), backward


class GRU(RecurrentStack):
    """x: (B, T, D) -> (out (B, T, dirs*H), h_n (L*dirs, B, H)); see RecurrentStack."""
    direction_cls = GRUDirection
