"""SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): y = silu(x W) * (x V)."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param


class SwiGLU(Module):
    """x: (..., d_in) -> y: (..., d_hidden). The Transformer FFN adds its own down-projection (d_hidden -> d_model).

    W and V are stored side by side in ONE Param `W_gate_up` of shape (d_in, 2 d_hidden): columns [:d_hidden] are W
    (the gate, through SiLU), columns [d_hidden:] are V, so the forward is one GEMM and the backward two. Optional
    bias `b` (2 d_hidden,), decay=False. Init is PyTorch nn.Linear's default for each, U(+-1/sqrt(d_in)).
    """

    def __init__(self, d_in: int, d_hidden: int, bias: bool = False, w_init=None):
        super().__init__()
        self.d_in, self.d_hidden = d_in, d_hidden
        init = w_init or initializers.torch_linear_default(d_in)
        self.W_gate_up = Param((d_in, 2 * d_hidden), init, decay=True)
        self.b = Param((2 * d_hidden,), initializers.torch_linear_default(d_in), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        Wgu, b, d_in, H = self.W_gate_up, self.b, self.d_in, self.d_hidden
        h = x @ Wgu.data  # (..., 2H)
        if b is not None:
            h += b.data
        a, v = h[..., :H], h[..., H:]  # gate pre-activation and value: views into h
        g, s = kernels.silu(a)  # (..., H)
        y = g * v  # (..., H)

        def backward(dy):
            dh = np.empty_like(h)  # (..., 2H): [d a, d v], written in place
            np.multiply(dy, g, out=dh[..., H:])
            da = dh[..., :H]
            np.multiply(dy, v, out=da)
            da[...] = kernels.silu_backward(da, a, s)
            dh2 = dh.reshape(-1, 2 * H)  # (N, 2H)
            Wgu.grad += x.reshape(-1, d_in).T @ dh2  # (d_in, 2H)
            if b is not None:
                b.grad += kernels.col_sum(dh2)
            return dh @ Wgu.data.T  # (..., d_in)

        return y, backward
