"""Small pure functions with their shape contracts: the math layers call, each tested alone.

Forward and backward sit side by side so one can be read against the other. No state, no Param: layers own those.
"""
from __future__ import annotations

import math

import numpy as np

# A large finite negative for masked attention scores: a fully masked row gives a uniform softmax over garbage that
# callers zero out, never NaN (which -inf would give: exp(-inf - -inf)).
MASK_VALUE = -1e9


# -- softmax ---------------------------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x: (..., K) -> p: (..., K), rows sum to 1. Subtracts the row max for stability."""
    z = x - x.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def softmax_backward(p: np.ndarray, dp: np.ndarray, axis: int = -1) -> np.ndarray:
    """dx = p * (dp - sum(dp * p)) along `axis`."""
    dx = dp * p
    dx -= p * dx.sum(axis=axis, keepdims=True)
    return dx


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x: (..., K) -> log p: (..., K)."""
    z = x - x.max(axis=axis, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z


# -- normalization ---------------------------------------------------------------------------------------------------
def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, eps: float = 1e-5):
    """x: (..., D) -> y: (..., D), plus (xhat, rstd) for the backward. Biased variance, as in Ba et al. / PyTorch."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    y = xhat * gamma
    if beta is not None:
        y += beta
    return y, (xhat, rstd)


def layer_norm_backward(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray):
    """Closed form: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.

    Returns dx (..., D), dgamma (D,), dbeta (D,).
    """
    D = xhat.shape[-1]
    dgamma = (dy * xhat).reshape(-1, D).sum(axis=0)
    dbeta = dy.reshape(-1, D).sum(axis=0)
    g = dy * gamma
    dx = g - g.mean(axis=-1, keepdims=True)
    dx -= xhat * np.mean(g * xhat, axis=-1, keepdims=True)
    dx *= rstd
    return dx, dgamma, dbeta


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6):
    """Zhang & Sennrich (2019): y = x / sqrt(mean(x^2) + eps) * gamma. Returns y and (xhat, rstd)."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * gamma, (xhat, rstd)


def rms_norm_backward(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, gamma: np.ndarray):
    """dx = rstd * (g - xhat * mean(g * xhat)), g = dy * gamma. Returns dx, dgamma."""
    D = xhat.shape[-1]
    dgamma = (dy * xhat).reshape(-1, D).sum(axis=0)
    g = dy * gamma
    dx = g - xhat * np.mean(g * xhat, axis=-1, keepdims=True)
    dx *= rstd
    return dx, dgamma


# -- activations -----------------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray):
    """GELU, tanh approximation (Hendrycks & Gimpel): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Returns y and t = tanh(...) for the backward (tanh is the expensive part: computed once).
    """
    t = x * x
    t *= 0.044715
    t += 1.0
    t *= x
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, t


def gelu_tanh_backward(dy: np.ndarray, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    inner = x * x
    inner *= 3 * 0.044715 * _SQRT_2_OVER_PI
    inner += _SQRT_2_OVER_PI
    inner *= x
    sech2 = t * t
    np.subtract(1.0, sech2, out=sech2)
    inner *= sech2
    inner += t
    inner += 1.0
    inner *= 0.5
    inner *= dy
    return inner


def gelu_erf(x: np.ndarray):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). Returns y and Phi(x)."""
    from scipy.special import erf  # NumPy has no erf
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    return x * cdf, cdf


def gelu_erf_backward(dy: np.ndarray, x: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """d/dx = Phi(x) + x phi(x)."""
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable for large |x| (no overflow warning): 0.5 (1 + tanh(x / 2))."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))
