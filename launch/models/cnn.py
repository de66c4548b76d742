"""Small CNN for image classification tasks ("digits": 8x8 grey images stored as 64 features) as a TaskModel.

    [model]                      # defaults
    channels = [32, 64]          # one stage per entry: Conv(k, "same") -> ReLU -> Conv(k, "same") -> ReLU -> MaxPool(2)
    kernel_size = 3
    head = "flatten"             # flatten (Flatten -> Linear) | gap (global average pooling -> Linear)
    hidden = 128                 # width of a hidden Linear + ReLU before the classifier; 0 for none
    dropout = 0.0                # before the classifier (train mode only)

Batches are the vector tasks' (x (B, H*W) float32, y (B,) int64): the first layer reshapes x to (B, 1, H, W) with
H = W = sqrt(n_features). Loss and metrics are the MLP's (cross-entropy, accuracy).
"""
from __future__ import annotations

import math

from ndtrain.engine.conv import Conv2d, Flatten, GlobalAvgPool, MaxPool2d
from ndtrain.engine.layers import Linear, ReLU
from ndtrain.engine.module import Module, Sequential
from ndtrain.launch.config import ConfigError, model_options
from ndtrain.launch.models import register_model
from ndtrain.launch.models.mlp import MLPModel
from ndtrain.engine.layers import Dropout

DEFAULTS = {"channels": [32, 64], "kernel_size": 3, "head": "flatten", "hidden": 128, "dropout": 0.0}


class ToImage(Module):
    """x: (B, C*H*W) -> (B, C, H, W): the vector tasks store images flattened."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.shape = (channels, height, width)

    def forward(self, x, *, train: bool):
        B = x.shape[0]
        return x.reshape((B,) + self.shape), lambda dy: dy.reshape(B, -1)


def build_cnn(side: int, n_out: int, channels=(32, 64), kernel_size: int = 3, head: str = "flatten",
              hidden: int = 128, dropout: float = 0.0) -> Sequential:
    """x (B, side*side) -> logits (B, n_out)."""
    layers: list[Module] = [ToImage(1, side, side)]
    c, s = 1, side
    for width in channels:
        layers += [Conv2d(c, width, kernel_size, padding="same"), ReLU(),
                   Conv2d(width, width, kernel_size, padding="same"), ReLU()]
        if s >= 2:
            layers.append(MaxPool2d(2))
            s //= 2
        c = width
    if head == "gap":
        layers.append(GlobalAvgPool())
        d = c
    else:
        layers.append(Flatten())
        d = c * s * s
    if hidden:
        layers += [Linear(d, hidden), ReLU()]
        d = hidden
    if dropout > 0:
        layers.append(Dropout(dropout))
    layers.append(Linear(d, n_out))
    return Sequential(*layers)


@register_model("cnn")
def cnn(task_info, cfg) -> MLPModel:
    table = cfg.model if hasattr(cfg, "model") else (cfg or {})
    opts = model_options(table, DEFAULTS, "cnn")
    if task_info.kind != "classification":
        raise ConfigError(f"run.model: 'cnn' needs an image classification task; task {task_info.name!r} is "
                          f"{task_info.kind}")
    side = math.isqrt(task_info.n_features)
    if side * side != task_info.n_features:
        raise ConfigError(f"run.model: 'cnn' needs square images; task {task_info.name!r} has "
                          f"{task_info.n_features} features")
    if not opts["channels"] or any(c < 1 for c in opts["channels"]):
        raise ConfigError(f"model.channels: a non-empty list of widths >= 1, got {opts['channels']}")
    if opts["head"] not in ("flatten", "gap"):
        raise ConfigError(f"model.head: must be 'flatten' or 'gap', got {opts['head']!r}")
    if opts["kernel_size"] < 1 or opts["hidden"] < 0 or not 0.0 <= opts["dropout"] < 1.0:
        raise ConfigError(f"model: kernel_size >= 1, hidden >= 0 and dropout in [0, 1) required; got "
                          f"{opts['kernel_size']}, {opts['hidden']}, {opts['dropout']}")
    module = build_cnn(side, task_info.n_outputs, opts["channels"], opts["kernel_size"], opts["head"],
                       opts["hidden"], opts["dropout"])
    return MLPModel(module, "classification")
