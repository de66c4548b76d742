"""Initializers: `fn(rng, shape, dtype) -> array`, the signature `Param.init` takes.

Weights of Linear layers are stored as (in, out), so for 2-D shapes fan_in = shape[0] and fan_out = shape[1].
For N-D convolution kernels stored (C_out, C_in, *k): fan_in = C_in * prod(k), fan_out = C_out * prod(k).
Each factory takes optional `fan_in`/`fan_out` overrides for other layouts.
"""
from __future__ import annotations

import math

import numpy as np


def fans(shape: tuple) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def _fans(shape, fan_in, fan_out):
    fi, fo = fans(shape)
    return fan_in or fi, fan_out or fo


def zeros():
    return lambda rng, shape, dtype: np.zeros(shape, dtype)


def ones():
    return lambda rng, shape, dtype: np.ones(shape, dtype)


def constant(value: float):
    return lambda rng, shape, dtype: np.full(shape, value, dtype)


def normal(std: float = 0.02, mean: float = 0.0):
    return lambda rng, shape, dtype: (mean + std * rng.standard_normal(shape)).astype(dtype)


def uniform(low: float, high: float):
    return lambda rng, shape, dtype: rng.uniform(low, high, shape).astype(dtype)


def xavier_uniform(gain: float = 1.0, fan_in: int | None = None, fan_out: int | None = None):
    """Glorot & Bengio (2010): U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""
    def init(rng, shape, dtype):
        fi, fo = _fans(shape, fan_in, fan_out)
        a = gain * math.sqrt(6.0 / (fi + fo))
        return rng.uniform(-a, a, shape).astype(dtype)
    return init


def xavier_normal(gain: float = 1.0, fan_in: int | None = None, fan_out: int | None = None):
    """Glorot & Bengio (2010): N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    def init(rng, shape, dtype):
        fi, fo = _fans(shape, fan_in, fan_out)
        return (gain * math.sqrt(2.0 / (fi + fo)) * rng.standard_normal(shape)).astype(dtype)
    return init


def kaiming_uniform(a: float = 0.0, mode: str = "fan_in", fan_in: int | None = None, fan_out: int | None = None):
    """He et al. (2015), for (leaky) ReLU with negative slope `a`: U(-b, b), b = sqrt(6 / ((1 + a^2) fan))."""
    def init(rng, shape, dtype):
        fan = _fans(shape, fan_in, fan_out)[0 if mode == "fan_in" else 1]
        b = math.sqrt(6.0 / ((1.0 + a * a) * fan))
        return rng.uniform(-b, b, shape).astype(dtype)
    return init


def kaiming_normal(a: float = 0.0, mode: str = "fan_in", fan_in: int | None = None, fan_out: int | None = None):
    """He et al. (2015): N(0, std^2), std = sqrt(2 / ((1 + a^2) fan))."""
    def init(rng, shape, dtype):
        fan = _fans(shape, fan_in, fan_out)[0 if mode == "fan_in" else 1]
        return (math.sqrt(2.0 / ((1.0 + a * a) * fan)) * rng.standard_normal(shape)).astype(dtype)
    return init


def scaled_residual(n_layers: int, std: float = 0.02):
    """GPT-2's init for projections that write into the residual stream: N(0, (std / sqrt(2 n_layers))^2)."""
    return normal(std / math.sqrt(2.0 * n_layers))


def torch_linear_default(fan_in: int | None = None):
    """PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (for weights and biases alike)."""
    def init(rng, shape, dtype):
        fi = fan_in or fans(shape)[0]
        b = 1.0 / math.sqrt(fi)
        return rng.uniform(-b, b, shape).astype(dtype)
    return init
