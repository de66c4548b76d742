"""Elementwise activations and Softmax: x (...) -> y (same shape and dtype), forward returning its backward.

Each backward keeps only what the derivative needs (x, y or a cached sigmoid/tanh) and allocates one output; it
never writes into `dy` (a residual branch may still need it). Derivatives at kinks take PyTorch's side.
"""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param


class ReLU(Module):
    """x: (...) -> max(x, 0): (...)."""

    def forward(self, x, *, train: bool):
        y = kernels.relu(x)
        return y, lambda dy: kernels.relu_backward(dy, y)


class LeakyReLU(Module):
    """x: (...) -> x if x > 0 else slope * x: (...). PyTorch's default slope is 0.01."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x, *, train: bool):
        slope = self.slope
        y = x * slope
        # max(x, slope x) is the leaky ReLU when 0 <= slope <= 1: one pass, no mask.
        if 0.0 <= slope <= 1.0:
            np.maximum(x, y, out=y)
        else:
            np.copyto(y, x, where=x > 0)

        def backward(dy):
            dx = dy * slope
            np.copyto(dx, dy, where=x > 0)
            return dx

        return y, backward


class PReLU(Module):
    """Parametric ReLU (He et al. 2015): x if x > 0 else a * x, with a learned.

    x: (..., C) -> (..., C). num_parameters=1 shares one slope; num_parameters=C learns one per channel of the LAST
    axis (PyTorch's nn.PReLU uses axis 1, which is the last axis for (B, C) inputs). Init 0.25 as in the paper and
    PyTorch; decay=False (weight decay would push the slopes to 0, i.e. to a ReLU).
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25):
        super().__init__()
        self.num_parameters = int(num_parameters)
        self.a = Param((self.num_parameters,), initializers.constant(init), decay=False)

    def forward(self, x, *, train: bool):
        a = self.a
        C = self.num_parameters
        if C != 1 and x.shape[-1] != C:
            raise ValueError(f"PReLU {self.path or ''}: input last axis is {x.shape[-1]}, expected {C} channels")
        pos = x > 0
        y = x * a.data  # (..., C); (1,) broadcasts for the shared slope
        np.copyto(y, x, where=pos)

        def backward(dy):
            # da = sum over the negative side of dy * x
            dyx = np.multiply(dy, x)
            dyx[pos] = 0
            if C == 1:
                a.grad += dyx.sum()
            else:
                a.grad += dyx.reshape(-1, C).sum(axis=0)
            dx = np.multiply(dy, a.data, out=dyx)
            np.copyto(dx, dy, where=pos)
            return dx

        return y, backward


class Sigmoid(Module):
    """x: (...) -> 1 / (1 + exp(-x)): (...), without overflow for large |x|."""

    def forward(self, x, *, train: bool):
        y = kernels.sigmoid(x)
        return y, lambda dy: kernels.sigmoid_backward(dy, y)


class Tanh(Module):
    """x: (...) -> tanh(x): (...)."""

    def forward(self, x, *, train: bool):
        y = np.tanh(x)
        return y, lambda dy: kernels.tanh_backward(dy, y)


class GELU(Module):
    """Gaussian Error Linear Unit (Hendrycks & Gimpel 2016): x Phi(x). x: (...) -> (...).

    approximate="tanh" (the default here; GPT-2's and BERT's choice, PyTorch's approximate="tanh") uses
    0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))), computed as x sigmoid(2u) by kernels.gelu_tanh (the kernel the
    Transformer FFN uses too): numpy has no erf, so it is the fast one.
    approximate="none" is exact (erf from scipy), PyTorch's default; the two differ by < 1e-3.
    """

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GELU: approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x, *, train: bool):
        if self.approximate == "tanh":
            if train:  # dgelu/dx computed now, chunk by chunk in cache: the backward is one multiply
                y, dydx = kernels.gelu_tanh_with_derivative(x)
                return y, lambda dy: np.multiply(dy, dydx, dtype=np.result_type(dy, dydx))
            y, s = kernels.gelu_tanh(x)  # s = sigmoid(2u), all the backward needs besides x
            return y, lambda dy: kernels.gelu_tanh_backward(dy, x, s)
        y, cdf = kernels.gelu_erf(x)
        return y, lambda dy: kernels.gelu_erf_backward(dy, x, cdf)


class SiLU(Module):
    """Sigmoid Linear Unit / Swish-1: x sigmoid(x). x: (...) -> (...)."""

    def forward(self, x, *, train: bool):
        y, s = kernels.silu(x)
        return y, lambda dy: kernels.silu_backward(dy, x, s)


Swish = SiLU


class Softmax(Module):
    """x: (..., K, ...) -> probabilities along `axis` (sum to 1). Masked entries should hold kernels.MASK_VALUE
    (finite): a fully masked row then gives a uniform row, never NaN."""

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = axis

    def forward(self, x, *, train: bool):
        axis = self.axis
        p = kernels.softmax(x, axis=axis)
        return p, lambda dp: kernels.softmax_backward(p, dp, axis=axis)
