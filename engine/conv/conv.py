"""Conv2d and Conv1d (cross-correlation, as torch), NCHW / NCL, weights (C_out, C_in, kh, kw) / (C_out, C_in, k)
exactly like torch so they can be copied across. Forward: im2col + GEMM chunk by chunk over the batch; backward:
dW by gathering the columns again (chunked), dx as a convolution of dy at stride 1, else GEMM + col2im.
Conv1d is Conv2d over a height-1 image (the weight is viewed as (C_out, C_in, 1, k); no copy).
"""
from __future__ import annotations

import numpy as np

from .. import init as initializers
from ..module import Module
from ..params import Param
from .im2col import (conv_windows, gather_cols, image_chunks, output_size, pad_nhwc, pair, resolve_padding,
                     scatter_cols)


def _conv_gemm(xh, W_mat, b, kernel, stride, dilation):
    """xh: padded channels-last (N, Hp, Wp, C); W_mat: (kh*kw*C, C_out); b: (C_out,) or None -> (N*Ho*Wo, C_out),
    one gather + GEMM (+ bias, while the chunk is in cache) per chunk of images into a reused buffer (see
    im2col.CHUNK_ROWS)."""
    win = conv_windows(xh, kernel, stride, dilation)  # (N, Ho, Wo, kh, kw, C) view
    N, Ho, Wo = win.shape[:3]
    P = Ho * Wo
    y = np.empty((N * P, W_mat.shape[1]), xh.dtype)
    chunks = image_chunks(N, P)
    buf = np.empty((chunks[0][1] - chunks[0][0],) + win.shape[1:], xh.dtype)
    for n0, n1 in chunks:
        cols = gather_cols(buf[:n1 - n0], xh, win, n0, kernel, stride, dilation)  # ((n1-n0)*P, kh*kw*C)
        y_chunk = np.matmul(cols, W_mat, out=y[n0 * P:n1 * P])
        if b is not None:
            y_chunk += b
    return y


def conv2d_forward(x, W, b, stride, pads, dilation):
    """x: (N, C, H, W); W: (C_out, C, kh, kw); b: (C_out,) or None -> y (N, C_out, Ho, Wo) (a channels-last array
    seen as NCHW: the next conv's channels-last copy is then a plain copy) and xh, the padded channels-last input
    (N, Hp, Wp, C) from which the backward gathers the columns again (cheaper than keeping them: see CHUNK_ROWS)."""
    N, C, H, Wd = x.shape
    C_out, C_w, kh, kw = W.shape
    if C != C_w:
        raise ValueError(f"conv: input has {C} channels, the weight expects {C_w}")
    Ho = output_size(H, kh, stride[0], dilation[0], pads[0])
    Wo = output_size(Wd, kw, stride[1], dilation[1], pads[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv: input {H}x{Wd} is smaller than the (dilated) kernel {kh}x{kw} after padding")
    xh = pad_nhwc(x, pads)
    W_mat = np.ascontiguousarray(W.transpose(2, 3, 1, 0)).reshape(-1, C_out)  # (kh*kw*C, C_out), rows (ki, kj, c)
    y = _conv_gemm(xh, W_mat, b, (kh, kw), stride, dilation)  # (N*Ho*Wo, C_out)
    return y.reshape(N, Ho, Wo, C_out).transpose(0, 3, 1, 2), xh


def conv2d_backward(dy, x_shape, xh, W, stride, pads, dilation, dW, db):
    """dy: (N, C_out, Ho, Wo); xh: the forward's padded channels-last input. Accumulates dW (C_out, C, kh, kw)
    and db (C_out,) when given; returns dx (N, C, H, W)."""
    N, C, H, Wd = x_shape
    C_out, _, kh, kw = W.shape
    Ho, Wo = dy.shape[2:]
    P = Ho * Wo
    dy2 = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(N * P, C_out)  # free if dy is channels-last
    if db is not None:
        db += dy2.sum(axis=0)
    full = [d * (k - 1) for d, k in zip(dilation, (kh, kw))]
    # At stride 1, dx is dy correlated with the flipped kernel, channels swapped (a "full" convolution): gather +
    # GEMM again, which beats a col2im scatter of kh*kw strided adds. Not when C < C_out (the first layer): then the
    # GEMM + scatter moves kh*kw*C values per pixel against the gather's kh*kw*C_out.
    as_conv = stride == (1, 1) and C >= C_out and all(lo <= f and hi <= f for (lo, hi), f in zip(pads, full))
    win = conv_windows(xh, (kh, kw), stride, dilation)  # (N, Ho, Wo, kh, kw, C)
    if as_conv:
        dyh = pad_nhwc(dy, tuple((f - lo, f - hi) for (lo, hi), f in zip(pads, full)))
        dwin = conv_windows(dyh, (kh, kw), (1, 1), dilation)  # (N, H, W, kh, kw, C_out)
        W_flip = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)).reshape(-1, C)  # (kh*kw*C_out, C)
        dx = np.empty((N * H * Wd, C), dy2.dtype)
    else:
        W_mat = W.transpose(0, 2, 3, 1).reshape(C_out, -1)  # (C_out, kh*kw*C)
        dxh = np.zeros(xh.shape, dy2.dtype)
    chunks = image_chunks(N, P)
    b = chunks[0][1] - chunks[0][0]
    per_image = max(win[0].size, dwin[0].size if as_conv else 0)
    buf = np.empty(b * per_image, xh.dtype)  # one scratch buffer for both gathers, hot in cache
    gW = np.zeros((C_out, kh * kw * C), xh.dtype)  # dW with columns (ki, kj, c)
    part = np.empty_like(gW)
    # one pass over the chunks does dW and dx, so each chunk of dy is read while in cache
    for n0, n1 in chunks:
        dy_chunk = dy2[n0 * P:n1 * P]
        cols = gather_cols(buf[:(n1 - n0) * win[0].size].reshape((n1 - n0,) + win.shape[1:]), xh, win, n0,
                           (kh, kw), stride, dilation)
        gW += np.matmul(dy_chunk.T, cols, out=part)
        if as_conv:
            dcols = gather_cols(buf[:(n1 - n0) * dwin[0].size].reshape((n1 - n0,) + dwin.shape[1:]), dyh, dwin, n0,
                                (kh, kw), (1, 1), dilation)
            np.matmul(dcols, W_flip, out=dx[n0 * H * Wd:n1 * H * Wd])
        else:
            scatter_cols(dxh, dy_chunk @ W_mat, n0, (kh, kw), stride, dilation)
    dW += gW.reshape(C_out, kh, kw, C).transpose(0, 3, 1, 2)
    if as_conv:
        return dx.reshape(N, H, Wd, C).transpose(0, 3, 1, 2)
    (t, _), (l, _) = pads
    return dxh[:, t:t + H, l:l + Wd].transpose(0, 3, 1, 2)


class Conv2d(Module):
    """x: (N, C_in, H, W) -> y: (N, C_out, Ho, Wo). padding: "same" | "valid" | int | (ph, pw).
    Init as torch (kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)) for weight and bias)."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding="valid", dilation=1, bias: bool = True):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.dilation = pair(stride, "stride"), pair(dilation, "dilation")
        self.pads = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        fan_in = c_in * self.kernel_size[0] * self.kernel_size[1]
        self.W = Param((c_out, c_in) + self.kernel_size, initializers.torch_linear_default(fan_in), decay=True)
        self.b = Param((c_out,), initializers.torch_linear_default(fan_in), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        W, b = self.W, self.b
        y, xh = conv2d_forward(x, W.data, None if b is None else b.data, self.stride, self.pads, self.dilation)

        def backward(dy):
            return conv2d_backward(dy, x.shape, xh, W.data, self.stride, self.pads, self.dilation, W.grad,
                                   None if b is None else b.grad)

        return y, backward


class Conv1d(Module):
    """x: (N, C_in, L) -> y: (N, C_out, Lo); weight (C_out, C_in, k) as torch. padding: "same" | "valid" | int."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding="valid",
                 dilation: int = 1, bias: bool = True):
        super().__init__()
        self.c_in, self.c_out, self.kernel_size = c_in, c_out, int(kernel_size)
        self.stride, self.dilation = (1, int(stride)), (1, int(dilation))
        if isinstance(padding, str):
            self.pads = ((0, 0),) + resolve_padding(padding, (1, self.kernel_size), self.stride, self.dilation)[1:]
        else:
            self.pads = ((0, 0), (int(padding), int(padding)))
        fan_in = c_in * self.kernel_size
        self.W = Param((c_out, c_in, self.kernel_size), initializers.torch_linear_default(fan_in), decay=True)
        self.b = Param((c_out,), initializers.torch_linear_default(fan_in), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        W, b = self.W, self.b
        W4 = W.data[:, :, None, :]  # (C_out, C_in, 1, k) view
        x4 = x[:, :, None, :]  # (N, C_in, 1, L)
        y, xh = conv2d_forward(x4, W4, None if b is None else b.data, self.stride, self.pads, self.dilation)

        def backward(dy):
            dx = conv2d_backward(dy[:, :, None, :], x4.shape, xh, W4, self.stride, self.pads, self.dilation,
                                 W.grad[:, :, None, :], None if b is None else b.grad)
            return dx[:, :, 0, :]

        return y[:, :, 0, :], backward
