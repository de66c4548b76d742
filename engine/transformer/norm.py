"""The Transformer's choice of normalization by name (config `norm = "layer" | "rms"`).

The layers themselves are engine.layers.LayerNorm / RMSNorm (one implementation, on engine.kernels); they are
re-exported here so `from ndtrain.engine.transformer import LayerNorm` keeps working.
"""
from __future__ import annotations

from ..layers.norm import LayerNorm, RMSNorm
from ..module import Module

__all__ = ["LayerNorm", "RMSNorm", "make_norm"]


def make_norm(kind: str, d_model: int) -> Module:
    """kind: 'layer' (LayerNorm, eps 1e-5, with bias) or 'rms' (RMSNorm, eps 1e-6) over a last axis of d_model."""
    if kind == "layer":
        return LayerNorm(d_model)
    if kind == "rms":
        return RMSNorm(d_model)
    raise ValueError(f"norm: unknown kind {kind!r} (expected 'layer' or 'rms')")
