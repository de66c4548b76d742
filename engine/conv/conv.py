"""Conv2d and Conv1d (cross-correlation, as torch), NCHW / NCL, weights (C_out, C_in, kh, kw) / (C_out, C_in, k)
exactly like torch so they can be copied across. Forward: im2col + one GEMM; backward: two GEMMs + col2im.
Conv1d is Conv2d over a height-1 image (the weight is viewed as (C_out, C_in, 1, k); no copy).
"""
from __future__ import annotations


from .. import init as initializers
from ..module import Module
from ..params import Param
from .im2col import col2im, im2col, output_size, pair, resolve_padding


def conv2d_forward(x, W, b, stride, pads, dilation):
    """x: (N, C, H, W); W: (C_out, C, kh, kw); b: (C_out,) or None -> y (N, C_out, Ho, Wo) and the im2col
    columns (N*Ho*Wo, kh*kw*C) the backward needs."""
    N, C, H, Wd = x.shape
    C_out, C_w, kh, kw = W.shape
    if C != C_w:
        raise ValueError(f"conv: input has {C} channels, the weight expects {C_w}")
    Ho = output_size(H, kh, stride[0], dilation[0], pads[0])
    Wo = output_size(Wd, kw, stride[1], dilation[1], pads[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv: input {H}x{Wd} is smaller than the (dilated) kernel {kh}x{kw} after padding")
    cols = im2col(x, pads, (kh, kw), stride, dilation)  # (N*Ho*Wo, kh*kw*C)
    y = cols @ W.transpose(0, 2, 3, 1).reshape(C_out, -1).T  # (N*Ho*Wo, C_out)
    if b is not None:
        y += b
    return y.reshape(N, Ho, Wo, C_out).transpose(0, 3, 1, 2), cols


def conv2d_backward(dy, x_shape, cols, W, stride, pads, dilation, dW, db):
    """dy: (N, C_out, Ho, Wo). Accumulates dW (C_out, C, kh, kw) and db (C_out,) when given; returns dx."""
    C_out, C, kh, kw = W.shape
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, C_out)  # (N*Ho*Wo, C_out)
    dW += (dy2.T @ cols).reshape(C_out, kh, kw, C).transpose(0, 3, 1, 2)
    if db is not None:
        db += dy2.sum(axis=0)
    full = [d * (k - 1) for d, k in zip(dilation, (kh, kw))]
    if stride == (1, 1) and all(lo <= f and hi <= f for (lo, hi), f in zip(pads, full)):
        # At stride 1, dx is dy correlated with the flipped kernel, channels swapped (a "full" convolution):
        # im2col + GEMM again, which beats a col2im scatter of kh*kw strided adds.
        W_flip = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, C_out, kh, kw)
        pads_t = tuple((f - lo, f - hi) for (lo, hi), f in zip(pads, full))
        dx, _ = conv2d_forward(dy, W_flip, None, (1, 1), pads_t, dilation)
        return dx
    dcols = dy2 @ W.transpose(0, 2, 3, 1).reshape(C_out, -1)  # (N*Ho*Wo, kh*kw*C)
    return col2im(dcols, x_shape, pads, W.shape[2:], stride, dilation)


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
        y, cols = conv2d_forward(x, W.data, None if b is None else b.data, self.stride, self.pads, self.dilation)

        def backward(dy):
            return conv2d_backward(dy, x.shape, cols, W.data, self.stride, self.pads, self.dilation, W.grad,
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
        y, cols = conv2d_forward(x4, W4, None if b is None else b.data, self.stride, self.pads, self.dilation)

        def backward(dy):
            dx = conv2d_backward(dy[:, :, None, :], x4.shape, cols, W4, self.stride, self.pads, self.dilation,
                                 W.grad[:, :, None, :], None if b is None else b.grad)
            return dx[:, :, 0, :]

        return y[:, :, 0, :], backward
