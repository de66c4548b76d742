"""Convolutional layers (im2col + GEMM, col2im backward) and pooling, NCHW, torch's weight layout."""
from .conv import Conv1d, Conv2d, conv2d_backward, conv2d_forward
from .flatten import Flatten
from .pool import AvgPool2d, GlobalAvgPool, MaxPool2d

__all__ = ["Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool", "Flatten", "conv2d_forward",
           "conv2d_backward"]
