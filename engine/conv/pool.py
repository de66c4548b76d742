"""Pooling over NCHW: MaxPool2d, AvgPool2d (torch semantics, count_include_pad=True), GlobalAvgPool.

Windows are a strided view (im2col.windows); the backward scatters with one strided slice-add per kernel offset.
Max pooling sends the gradient to the first maximum of each window (torch's choice on ties).
"""
from __future__ import annotations

import numpy as np

from ..module import Module
from .im2col import pad_input, pair, scatter_windows, windows


def _pool_geometry(kernel_size, stride, padding):
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    p = pair(padding, "padding")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"pool padding {p} must be at most half the kernel {k} (as in torch)")
    return k, s, ((p[0], p[0]), (p[1], p[1]))


class MaxPool2d(Module):
    """x: (N, C, H, W) -> (N, C, Ho, Wo); stride defaults to the kernel size; padding pads with -inf."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.pads = _pool_geometry(kernel_size, stride, padding)

    def forward(self, x, *, train: bool):
        (kh, kw), s, pads = self.kernel_size, self.stride, self.pads
        if s == (kh, kw) and pads == ((0, 0), (0, 0)):
            return _max_pool_tiled(x, kh, kw)
        xp = pad_input(x, pads, value=-np.inf)
        v = windows(xp, (kh, kw), s, (1, 1))  # (N, C, Ho, Wo, kh, kw) view
        N, C, Ho, Wo = v.shape[:4]
        flat = v.reshape(N, C, Ho, Wo, kh * kw)  # copies
        arg = flat.argmax(axis=-1)  # (N, C, Ho, Wo): first maximum
        y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]

        def backward(dy):
            offsets = np.arange(kh * kw).reshape(kh, kw, 1, 1, 1, 1)
            dwin = (arg[None, None] == offsets) * dy[None, None]  # (kh, kw, N, C, Ho, Wo)
            dxp = scatter_windows(dwin.astype(dy.dtype, copy=False), xp.shape, s, (1, 1), dy.dtype)
            (t, _), (l, _) = pads
            return dxp[:, :, t:t + x.shape[2], l:l + x.shape[3]]

        return y, backward


def _max_pool_tiled(x, kh, kw):
    """MaxPool2d with stride == kernel and no padding (the common MaxPool2d(2)): the windows tile the image, so
    they are a reshape view (N, C, Ho, kh, Wo, kw) of x and the max is kh*kw - 1 elementwise maxima; no window
    copy, no argmax. Outputs and dx keep x's memory layout (conv outputs are channels-last arrays seen as NCHW),
    so the ReLU and conv around the pool do not have to convert layouts."""
    N, C, H, W = x.shape
    Ho, Wo = H // kh, W // kw  # torch floors: trailing rows / columns that do not fill a window are dropped
    v = np.reshape(x[:, :, :Ho * kh, :Wo * kw], (N, C, Ho, kh, Wo, kw), copy=False)  # splitting axes: a view
    y = v[:, :, :, 0, :, 0].copy(order="K")  # (N, C, Ho, Wo)
    for ki in range(kh):
        for kj in range(kw):
            if ki or kj:
                np.maximum(y, v[:, :, :, ki, :, kj], out=y)

    def backward(dy):
        dx = np.zeros_like(x, dtype=dy.dtype)  # order "K": x's layout
        dv = np.reshape(dx[:, :, :Ho * kh, :Wo * kw], (N, C, Ho, kh, Wo, kw), copy=False)
        taken = np.zeros(y.shape, bool)
        for ki in range(kh):
            for kj in range(kw):
                # the first maximum in window order gets the gradient (torch's choice on ties)
                hit = v[:, :, :, ki, :, kj] == y
                if ki or kj:
                    hit &= ~taken
                taken |= hit
                np.multiply(dy, hit, out=dv[:, :, :, ki, :, kj])
        return dx

    return y, backward


class AvgPool2d(Module):
    """x: (N, C, H, W) -> (N, C, Ho, Wo); zero padding counted in the mean (torch's count_include_pad=True)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.pads = _pool_geometry(kernel_size, stride, padding)

    def forward(self, x, *, train: bool):
        (kh, kw), s, pads = self.kernel_size, self.stride, self.pads
        xp = pad_input(x, pads)
        y = windows(xp, (kh, kw), s, (1, 1)).mean(axis=(-2, -1))  # (N, C, Ho, Wo)

        def backward(dy):
            share = dy / (kh * kw)
            dwin = np.broadcast_to(share, (kh, kw) + share.shape)
            dxp = scatter_windows(dwin, xp.shape, s, (1, 1), dy.dtype)
            (t, _), (l, _) = pads
            return dxp[:, :, t:t + x.shape[2], l:l + x.shape[3]]

        return y, backward


class GlobalAvgPool(Module):
    """x: (N, C, *spatial) -> (N, C): the mean over every spatial position (Lin et al. 2013, Network in Network)."""

    def forward(self, x, *, train: bool):
        spatial = x.shape[2:]
        count = int(np.prod(spatial))
        y = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=-1)

        def backward(dy):
            return np.broadcast_to((dy / count)[(...,) + (None,) * len(spatial)], x.shape).copy()

        return y, backward
