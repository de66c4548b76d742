"""Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2, or SwiGLU (Shazeer 2020):
(silu(x W_gate) * (x W_up)) W2, with W_gate and W_up fused in one (D, 2F) GEMM."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param

ACTIVATIONS = ("relu", "gelu", "swiglu")
# Hidden elements per row block of the training GELU forward (GEMM, GELU, GEMM on one block at a time).
FFN_BLOCK_ELEMS = 1 << 18


class PositionWiseFFN(Module):
    """x: (..., D) -> (..., D); hidden width d_ff. activation: 'relu', 'gelu' (tanh approximation) or 'swiglu'."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True, out_init=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"PositionWiseFFN: unknown activation {activation!r} (expected one of {ACTIVATIONS})")
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w1 = Param((d_model, width), initializers.torch_linear_default(d_model))
        self.b1 = Param((width,), initializers.torch_linear_default(d_model), decay=False) if bias else None
        self.w2 = Param((d_ff, d_model), out_init or initializers.torch_linear_default(d_ff))
        self.b2 = Param((d_model,), initializers.torch_linear_default(d_ff), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        D, F = self.d_model, self.d_ff
        x2 = x.reshape(-1, D)
        # training GELU: by blocks of rows, GEMM -> bias, GELU and its derivative -> GEMM, each block's hidden
        # activations still in cache; the derivative overwrites h (dead after it), so the backward is one multiply
        # and keeps dgelu (N, F) instead of h and sigmoid(2u)
        if self.activation == "gelu" and train:
            return self._forward_gelu_train(x, x2)
        if not train:
            return self._infer(x, x2), None
        h = x2 @ self.w1.data  # (N, F) or (N, 2F)
        if self.b1 is not None:
            kernels.add_row_(h, self.b1.data)
        if self.activation == "gelu":
            a, s = kernels.gelu_tanh(h)  # the same kernel as engine.layers.GELU
        elif self.activation == "relu":
            a, s = kernels.relu(h), None
        else:
            gate, up = h[:, :F], h[:, F:]
            s = kernels.sigmoid(gate)
            silu = gate * s
            a = silu * up
        y = a @ self.w2.data
        if self.b2 is not None:
            kernels.add_row_(y, self.b2.data)

        def backward(dy):
            dy2 = self._output_backward(dy, a)
            da = dy2 @ self.w2.data.T  # (N, F)
            if self.activation == "gelu":
                dh = kernels.gelu_tanh_backward(da, h, s, out=da)  # da is ours: overwrite it
            elif self.activation == "relu":
                dh = kernels.relu_backward(da, h, out=da)
            else:
                dh = np.empty_like(h)
                np.multiply(da, silu, out=dh[:, F:])  # d up
                # d silu(g)/dg = s (1 + g (1 - s))
                dsilu = 1.0 - s
                dsilu *= gate
                dsilu += 1.0
                dsilu *= s
                dsilu *= up
                np.multiply(da, dsilu, out=dh[:, :F])
            self.w1.grad += x2.T @ dh
            if self.b1 is not None:
                self.b1.grad += kernels.col_sum(dh)
            return (dh @ self.w1.data.T).reshape(x.shape)

        return y.reshape(x.shape), backward

    def _infer(self, x, x2):
        """Forward only: by blocks of rows as the training GELU path (GEMM -> activation in place -> GEMM while the
        block's (G, F) hidden activations are in cache), with no derivative (no s, no dgelu) and nothing kept;
        returns y (..., D)."""
        D, F = self.d_model, self.d_ff
        N = x2.shape[0]
        W1, W2 = self.w1.data, self.w2.data
        b1 = None if self.b1 is None else self.b1.data
        y = np.empty((N, D), dtype=np.result_type(x2, W1))
        G = max(1, FFN_BLOCK_ELEMS // W1.shape[1])
        h_buf = np.empty((min(G, N), W1.shape[1]), dtype=y.dtype)
        for r0 in range(0, N, G):
            r1 = min(N, r0 + G)
            h = np.matmul(x2[r0:r1], W1, out=h_buf[:r1 - r0])  # (G, F) or (G, 2F)
            if b1 is not None:
                kernels.add_row_(h, b1)
            if self.activation == "gelu":
                a = kernels.gelu_tanh_inplace(h)
            elif self.activation == "relu":
                a = np.maximum(h, 0, out=h)
            else:
                a = kernels.silu(h[:, :F])[0]
                a *= h[:, F:]
            np.matmul(a, W2, out=y[r0:r1])
        if self.b2 is not None:
            kernels.add_row_(y, self.b2.data)
        return y.reshape(x.shape)

    def _output_backward(self, dy, a):
        """The output projection's parameter gradients from dy (..., D) and the hidden activation a (N, F);
        returns dy as (N, D)."""
        dy2 = dy.reshape(-1, self.d_model)
        self.w2.grad += a.T @ dy2
        if self.b2 is not None:
            self.b2.grad += kernels.col_sum(dy2)
        return dy2

    def _forward_gelu_train(self, x, x2):
        D, F = self.d_model, self.d_ff
        N = x2.shape[0]
        b1 = None if self.b1 is None else self.b1.data
        dgelu = np.empty((N, F), dtype=np.result_type(x2, self.w1.data))  # h, then dgelu/dh in place
        a = np.empty_like(dgelu)  # (N, F)
        y = np.empty((N, D), dtype=dgelu.dtype)
        G = max(1, FFN_BLOCK_ELEMS // F)
        for r0 in range(0, N, G):
            r1 = min(N, r0 + G)
            hb = np.matmul(x2[r0:r1], self.w1.data, out=dgelu[r0:r1])
            kernels.gelu_tanh_with_derivative(hb, y=a[r0:r1], dydx=hb, bias=b1)
            np.matmul(a[r0:r1], self.w2.data, out=y[r0:r1])
        if self.b2 is not None:
            kernels.add_row_(y, self.b2.data)

        def backward(dy):
            """May be called once: dh (N, F) overwrites dgelu in place (no second (N, F) buffer)."""
            dy2 = self._output_backward(dy, a)
            # by blocks of rows, as the forward: a block's da (G, F) meets dgelu and feeds dx while in cache; the
            # weight gradient is then one GEMM over all N rows (K = N runs near peak; G-row pieces of it did not)
            dx = np.empty((N, D), dtype=dy2.dtype)
            da_buf = np.empty((min(G, N), F), dtype=dy2.dtype)
            for r0 in range(0, N, G):
                r1 = min(N, r0 + G)
                da = np.matmul(dy2[r0:r1], self.w2.data.T, out=da_buf[:r1 - r0])  # (G, F)
                dh = np.multiply(da, dgelu[r0:r1], out=dgelu[r0:r1])
                np.matmul(dh, self.w1.data.T, out=dx[r0:r1])
            self.w1.grad += x2.T @ dgelu  # dgelu now holds dh (N, F)
            if self.b1 is not None:
                self.b1.grad += kernels.col_sum(dgelu)
            return dx.reshape(x.shape)

        return y.reshape(x.shape), backward
