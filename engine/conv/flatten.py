"""Flatten: (N, *dims) -> (N, prod(dims)), the bridge from feature maps to a Linear head."""
from __future__ import annotations

from ..module import Module


class Flatten(Module):
    def forward(self, x, *, train: bool):
        shape = x.shape

        def backward(dy):
            return dy.reshape(shape)

        return x.reshape(shape[0], -1), backward
