"""LayerNorm and RMSNorm over the last axis: x (..., D) -> y (..., D). Math in engine.kernels.

The engine's only norm layers: the Transformer uses these too (engine.transformer.norm.make_norm)."""
from __future__ import annotations

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param


class LayerNorm(Module):
    """Ba et al. (2016): (x - mean) / sqrt(var + eps) * gamma + beta, statistics over the last axis (biased var,
    as PyTorch). x: (..., d) -> (..., d). gamma = 1, beta = 0 at init; decay=False for both (as nanoGPT / GPT-2).
    train=False: forward only, backward is None (nothing kept)."""

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.d, self.eps = d, eps
        self.gamma = Param((d,), initializers.ones(), decay=False)
        self.beta = Param((d,), initializers.zeros(), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        gamma, beta = self.gamma, self.beta
        if x.shape[-1] != self.d:
            raise ValueError(f"LayerNorm {self.path or ''}: input last axis is {x.shape[-1]}, expected {self.d}")
        y, (xhat, rstd) = kernels.layer_norm(x, gamma.data, None if beta is None else beta.data, self.eps)
        if not train:
            return y, None  # inference: xhat and rstd are freed here

        def backward(dy):
            dx, dgamma, dbeta = kernels.layer_norm_backward(dy, xhat, rstd, gamma.data)
            gamma.grad += dgamma
            if beta is not None:
                beta.grad += dbeta
            return dx

        return y, backward


class RMSNorm(Module):
    """Zhang & Sennrich (2019): x / sqrt(mean(x^2) + eps) * gamma over the last axis. x: (..., d) -> (..., d).
    gamma = 1 at init, decay=False."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.d, self.eps = d, eps
        self.gamma = Param((d,), initializers.ones(), decay=False)

    def forward(self, x, *, train: bool):
        gamma = self.gamma
        if x.shape[-1] != self.d:
            raise ValueError(f"RMSNorm {self.path or ''}: input last axis is {x.shape[-1]}, expected {self.d}")
        y, (xhat, rstd) = kernels.rms_norm(x, gamma.data, self.eps)
        if not train:
            return y, None

        def backward(dy):
            dx, dgamma = kernels.rms_norm_backward(dy, xhat, rstd, gamma.data)
            gamma.grad += dgamma
            return dx

        return y, backward
