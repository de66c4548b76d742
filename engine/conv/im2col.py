"""im2col / col2im for 2-D convolutions and pooling (NCHW at the interface), vectorized: windows come from a
strided view (np.lib.stride_tricks.sliding_window_view), so a convolution is a gather-copy plus a GEMM per chunk
of images (see CHUNK_ROWS); the adjoint scatters with one strided `+=` per kernel offset (kh*kw slices, never a loop
over pixels, no np.add.at). Convolution columns are gathered from a padded channels-last copy of the input
(pad_nhwc, gather_cols); pooling windows stay NCHW (`windows`). (conv.py avoids col2im at stride 1, where dx is
itself a convolution of dy.)

Geometry (as torch): out = floor((in + pad_lo + pad_hi - dilation * (k - 1) - 1) / stride) + 1 per spatial dim.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


# The GEMMs run over chunks of whole images of about this many im2col rows: a (512, kh*kw*C) block stays in cache
# between its gather and its GEMM, while one (N*Ho*Wo, kh*kw*C) matrix is streamed from memory twice. At 64 -> 64
# channels, 16x16, batch 32 this took the conv train step from ~42 to ~30 ms of CPU (1 thread); 512 and 1024 rows
# tied, 2048 lost ~15%.
CHUNK_ROWS = 512


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


def pad_nhwc(x: np.ndarray, pads) -> np.ndarray:
    """x: (N, C, H, W) -> (N, Hp, Wp, C): zero-padded and channels-last (one copy; a no-op transpose when x is
    itself a channels-last array seen as NCHW, as conv outputs are)."""
    (t, b), (l, r) = pads
    N, C, H, W = x.shape
    xh = np.zeros((N, H + t + b, W + l + r, C), x.dtype)
    xh[:, t:t + H, l:l + W] = x.transpose(0, 2, 3, 1)
    return xh


def conv_out_shape(xh_shape, kernel, stride, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution over a padded channels-last image (N, Hp, Wp, C)."""
    no_pad = ((0, 0), (0, 0))
    return (output_size(xh_shape[1], kernel[0], stride[0], dilation[0], no_pad[0]),
            output_size(xh_shape[2], kernel[1], stride[1], dilation[1], no_pad[1]))


def conv_windows(xh: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """xh: padded channels-last (N, Hp, Wp, C) -> read-only view (N, Ho, Wo, kh, kw, C) of every (strided,
    dilated) window: copied as is, it is the im2col matrix (row order (n, i, j), column order (ki, kj, c))."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    v = sliding_window_view(xh, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2))  # (N, Ho', Wo', C, kh', kw')
    return v[:, ::sh, ::sw, :, ::dh, ::dw].transpose(0, 1, 2, 4, 5, 3)


def gather_cols(out: np.ndarray, xh: np.ndarray, win: np.ndarray, n0: int, kernel, stride, dilation) -> np.ndarray:
    """Fills out (n, Ho, Wo, kh, kw, C) with the windows of images n0 .. n0+n of xh (N, Hp, Wp, C), whose
    conv_windows view is win; returns out viewed as the im2col matrix (n*Ho*Wo, kh*kw*C).

    Channels-last makes each window row a run of kw*C contiguous values; gathering NCHW windows copies runs of kw
    (often 3) values and was ~4x slower."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    n, Ho, Wo, C = out.shape[0], out.shape[1], out.shape[2], out.shape[5]
    if C < 8:
        # few channels (the first layer): one strided slice copy per kernel offset is ~20x faster than the
        # 6-D gather, whose innermost run would be C values
        src = xh[n0:n0 + n]
        for ki in range(kh):
            r0 = ki * dh
            for kj in range(kw):
                c0 = kj * dw
                out[:, :, :, ki, kj] = src[:, r0:r0 + sh * (Ho - 1) + 1:sh, c0:c0 + sw * (Wo - 1) + 1:sw]
    else:
        np.copyto(out, win[n0:n0 + n])
    return out.reshape(n * Ho * Wo, kh * kw * C)


def image_chunks(N: int, rows_per_image: int, rows: int | None = None) -> list[tuple[int, int]]:
    """[(n0, n1), ...]: batches of whole images of about `rows` (default CHUNK_ROWS) im2col rows each (at least one
    image)."""
    b = max(1, (rows or CHUNK_ROWS) // max(1, rows_per_image))
    return [(s, min(N, s + b)) for s in range(0, N, b)]


def im2col(x: np.ndarray, pads, kernel, stride, dilation) -> np.ndarray:
    """x: (N, C, H, W) -> cols (N*Ho*Wo, kh*kw*C) in one piece (conv.py gathers chunk by chunk instead). A torch
    weight (C_out, C, kh, kw) multiplies these columns as W.transpose(0, 2, 3, 1).reshape(C_out, -1)."""
    xh = pad_nhwc(x, pads)
    win = conv_windows(xh, kernel, stride, dilation)
    return gather_cols(np.empty(win.shape, x.dtype), xh, win, 0, kernel, stride, dilation)


def scatter_cols(dxh: np.ndarray, dcols: np.ndarray, n0: int, kernel, stride, dilation) -> None:
    """The adjoint of gather_cols: adds dcols (n*Ho*Wo, kh*kw*C) into images n0 .. n0+n of the padded
    channels-last dxh (N, Hp, Wp, C), one strided slice-add per kernel offset (overlapping windows sum)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Ho, Wo = conv_out_shape(dxh.shape, kernel, stride, dilation)
    C = dxh.shape[3]
    d = dcols.reshape(-1, Ho, Wo, kh, kw, C)
    dst = dxh[n0:n0 + d.shape[0]]
    for ki in range(kh):
        r0 = ki * dh
        for kj in range(kw):
            c0 = kj * dw
            dst[:, r0:r0 + sh * (Ho - 1) + 1:sh, c0:c0 + sw * (Wo - 1) + 1:sw] += d[:, :, :, ki, kj]


def col2im(dcols: np.ndarray, x_shape, pads, kernel, stride, dilation) -> np.ndarray:
    """The adjoint of im2col: dcols (N*Ho*Wo, kh*kw*C) -> dx (N, C, H, W)."""
    N, C, H, W = x_shape
    (t, b), (l, r) = pads
    dxh = np.zeros((N, H + t + b, W + l + r, C), dcols.dtype)
    scatter_cols(dxh, dcols, 0, kernel, stride, dilation)
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
