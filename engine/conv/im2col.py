"""im2col / col2im for 2-D convolutions and pooling (NCHW at the interface), vectorized: windows come from a
strided view (np.lib.stride_tricks.sliding_window_view), so a convolution is one gather-copy plus one GEMM; the
adjoint scatters with one strided `+=` per kernel offset (kh*kw slices, never a loop over pixels, no np.add.at).
Convolution columns are gathered channels-last (see im2col); pooling windows stay NCHW (`windows`).
(conv.py avoids col2im at stride 1, where dx is itself a convolution of dy.)

Geometry (as torch): out = floor((in + pad_lo + pad_hi - dilation * (k - 1) - 1) / stride) + 1 per spatial dim.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pair(v, name: str = "value") -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def resolve_padding(padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """-> ((top, bottom), (left, right)). "valid" = 0; "same" keeps the size at stride 1 (torch puts the odd extra
    pixel of an even kernel at the bottom/right); an int or a pair pads symmetrically."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return (ph, ph), (pw, pw)


def output_size(size: int, k: int, stride: int, dilation: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def pad_input(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def windows(xp: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """xp: (N, C, Hp, Wp) padded -> read-only view (N, C, Ho, Wo, kh, kw) of every (strided, dilated) window."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    v = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return v[:, :, ::sh, ::sw, ::dh, ::dw]


def im2col(x: np.ndarray, pads, kernel, stride, dilation) -> np.ndarray:
    """x: (N, C, H, W) -> cols (N*Ho*Wo, kh*kw*C): row order (n, i, j), column order (ki, kj, c).

    The image goes channels-last first (one copy), so each window row is copied in runs of C contiguous values;
    gathering NCHW windows directly copies runs of kw (often 3) values and was ~4x slower. A torch weight
    (C_out, C, kh, kw) multiplies these columns as W.transpose(0, 2, 3, 1).reshape(C_out, -1)."""
    (t, b), (l, r) = pads
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    N, C, H, W = x.shape
    xh = np.zeros((N, H + t + b, W + l + r, C), x.dtype)  # (N, Hp, Wp, C) padded, channels-last
    xh[:, t:t + H, l:l + W] = x.transpose(0, 2, 3, 1)
    Ho = output_size(H, kh, sh, dh, pads[0])
    Wo = output_size(W, kw, sw, dw, pads[1])
    if C < 8:
        # few channels (the first layer): one strided slice copy per kernel offset is ~20x faster than the
        # 6-D gather, whose innermost run would be C values
        cols = np.empty((N, Ho, Wo, kh, kw, C), x.dtype)
        for ki in range(kh):
            r0 = ki * dh
            for kj in range(kw):
                c0 = kj * dw
                cols[:, :, :, ki, kj] = xh[:, r0:r0 + sh * (Ho - 1) + 1:sh, c0:c0 + sw * (Wo - 1) + 1:sw]
        return cols.reshape(N * Ho * Wo, kh * kw * C)
    v = sliding_window_view(xh, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2))  # (N, Ho', Wo', C, kh', kw')
    v = v[:, ::sh, ::sw, :, ::dh, ::dw]
    return np.ascontiguousarray(v.transpose(0, 1, 2, 4, 5, 3)).reshape(N * Ho * Wo, kh * kw * C)


def col2im(dcols: np.ndarray, x_shape, pads, kernel, stride, dilation) -> np.ndarray:
    """The adjoint of im2col: dcols (N*Ho*Wo, kh*kw*C) -> dx (N, C, H, W), summing overlapping windows with one
    strided slice-add per kernel offset over the channels-last padded image."""
    N, C, H, W = x_shape
    (t, b), (l, r) = pads
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Ho = output_size(H, kh, sh, dh, pads[0])
    Wo = output_size(W, kw, sw, dw, pads[1])
    d = dcols.reshape(N, Ho, Wo, kh, kw, C)
    dxh = np.zeros((N, H + t + b, W + l + r, C), dcols.dtype)
    for ki in range(kh):
        r0 = ki * dh
        for kj in range(kw):
            c0 = kj * dw
            dxh[:, r0:r0 + sh * (Ho - 1) + 1:sh, c0:c0 + sw * (Wo - 1) + 1:sw] += d[:, :, :, ki, kj]
    return dxh[:, t:t + H, l:l + W].transpose(0, 3, 1, 2)


def scatter_windows(dwin: np.ndarray, padded_shape, stride, dilation, dtype) -> np.ndarray:
    """The adjoint of `windows`: dwin (kh, kw, N, C, Ho, Wo) -> dxp (N, C, Hp, Wp), summing overlapping windows.
    One strided slice-add per kernel offset (kh*kw of them)."""
    kh, kw, N, C, Ho, Wo = dwin.shape
    (sh, sw), (dh, dw) = stride, dilation
    dxp = np.zeros(padded_shape, dtype)
    for ki in range(kh):
        r0 = ki * dh
        for kj in range(kw):
            c0 = kj * dw
            dxp[:, :, r0:r0 + sh * (Ho - 1) + 1:sh, c0:c0 + sw * (Wo - 1) + 1:sw] += dwin[ki, kj]
    return dxp
