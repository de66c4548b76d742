"""Batch normalization (Ioffe & Szegedy 2015) over every axis but the last: x (B, D) or (B, T, D) -> same shape."""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..module import Module
from ..params import Param


class BatchNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per feature (last axis), statistics over all other axes.

    Train: batch statistics (biased var for normalizing); the buffers running_mean / running_var are updated in
    place with PyTorch's convention: r = (1 - momentum) r + momentum * stat, with the UNBIASED batch variance
    (N / (N - 1)). Eval: the running statistics, so the layer is a fixed affine map. gamma = 1, beta = 0,
    decay=False. Buffers are float32 like PyTorch's (cast to x's dtype on use).
    Backward (train), closed form with means over the N = prod(batch axes) rows:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma.
    """

    def __init__(self, d: int, momentum: float = 0.1, eps: float = 1e-5, buffer_dtype=np.float32):
        super().__init__()
        self.d, self.momentum, self.eps = d, momentum, eps
        self.gamma = Param((d,), initializers.ones(), decay=False)
        self.beta = Param((d,), initializers.zeros(), decay=False)
        self.register_buffer("running_mean", np.zeros(d, dtype=buffer_dtype))
        self.register_buffer("running_var", np.ones(d, dtype=buffer_dtype))

    def forward(self, x, *, train: bool):
        gamma, beta, D = self.gamma, self.beta, self.d
        if x.shape[-1] != D:
            raise ValueError(f"BatchNorm {self.path or ''}: input last axis is {x.shape[-1]}, expected {D}")
        x2 = x.reshape(-1, D)  # (N, D)
        N = x2.shape[0]
        if not train:
            rstd = 1.0 / np.sqrt(self.running_var.astype(x.dtype) + x.dtype.type(self.eps))  # (D,)
            scale = gamma.data * rstd  # (D,)
            y = x - self.running_mean.astype(x.dtype)
            y *= scale
            y += beta.data

            def backward_eval(dy):
                xhat = (x - self.running_mean.astype(x.dtype)) * rstd
                gamma.grad += (dy * xhat).reshape(-1, D).sum(axis=0)
                beta.grad += dy.reshape(-1, D).sum(axis=0)
                return dy * scale

            return y, backward_eval

        if N < 2:
            raise ValueError(f"BatchNorm {self.path or ''}: needs more than 1 value per feature in train mode, "
                             f"got input of shape {x.shape}")
        mean = x2.mean(axis=0)  # (D,)
        xhat = x2 - mean  # (N, D)
        var = np.einsum("nd,nd->d", xhat, xhat) / N  # biased, (D,); einsum avoids an (N, D) temporary
        rstd = 1.0 / np.sqrt(var + self.eps)
        xhat *= rstd
        y = xhat * gamma.data
        y += beta.data
        m = self.momentum
        self.running_mean *= 1.0 - m
        self.running_mean += (m * mean).astype(self.running_mean.dtype)
        self.running_var *= 1.0 - m
        self.running_var += (m * var * (N / (N - 1))).astype(self.running_var.dtype)

        def backward(dy):
            dy2 = dy.reshape(-1, D)  # (N, D)
            dbeta = dy2.sum(axis=0)
            dgamma = np.einsum("nd,nd->d", dy2, xhat)
            gamma.grad += dgamma
            beta.grad += dbeta
            # mean(g) = gamma dbeta / N, mean(g xhat) = gamma dgamma / N: reuse the sums
            dx = xhat * (dgamma / N)
            dx += dbeta / N
            np.subtract(dy2, dx, out=dx)
            dx *= gamma.data * rstd
            return dx.reshape(x.shape)

        return y.reshape(x.shape), backward
