"""Layers: each `forward(x, train)` returns `(y, backward)`; see engine.module."""
from .linear import Linear

__all__ = ["Linear"]
