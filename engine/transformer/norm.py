"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the last axis, on the fused kernels."""
from __future__ import annotations

from .. import init as initializers
from ..module import Module
from ..params import Param
from . import fused


class LayerNorm(Module):
    """x: (..., D) -> y: (..., D); gamma (D,) ones, beta (D,) zeros, neither decayed."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.gamma = Param((d_model,), initializers.ones(), decay=False)
        self.beta = Param((d_model,), initializers.zeros(), decay=False)

    def forward(self, x, *, train: bool):
        D = self.d_model
        y, xhat, rstd = fused.layer_norm(x.reshape(-1, D), self.gamma.data, self.beta.data, self.eps)

        def backward(dy):
            dx, dgamma, dbeta = fused.layer_norm_backward(dy.reshape(-1, D), xhat, rstd, self.gamma.data)
            self.gamma.grad += dgamma
            self.beta.grad += dbeta
            return dx.reshape(x.shape)

        return y.reshape(x.shape), backward


class RMSNorm(Module):
    """x: (..., D) -> x / rms(x) * gamma; gamma (D,) ones."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.gamma = Param((d_model,), initializers.ones(), decay=False)

    def forward(self, x, *, train: bool):
        D = self.d_model
        y, xhat, rstd = fused.rms_norm(x.reshape(-1, D), self.gamma.data, self.eps)

        def backward(dy):
            dx, dgamma, _ = fused.layer_norm_backward(dy.reshape(-1, D), xhat, rstd, self.gamma.data, rms=True)
            self.gamma.grad += dgamma
            return dx.reshape(x.shape)

        return y.reshape(x.shape), backward


def make_norm(kind: str, d_model: int) -> Module:
    if kind == "layer":
        return LayerNorm(d_model)
    if kind == "rms":
        return RMSNorm(d_model)
    raise ValueError(f"norm: unknown kind {kind!r} (expected 'layer' or 'rms')")
