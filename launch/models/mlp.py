"""MLP for the vector tasks: classification (softmax cross-entropy, or one logit + BCE for two classes) and
regression (MSE).

    [model]                      # defaults
    hidden = [64, 64]            # widths of the hidden layers: xor's 2-4-1 MLP is hidden = [4]
    activation = "relu"          # relu | tanh | sigmoid | gelu | leaky_relu | silu
    dropout = 0.0                # after every hidden activation (train mode only)
    binary_single_logit = true   # two classes -> one output unit with BCE-with-logits (the classic 2-4-1 net)

Batches: x (B, D) float32; y (B,) int64 labels, or (B, K) float32 regression targets.
"""
from __future__ import annotations

import numpy as np

from ndtrain.engine.layers import Linear
from ndtrain.engine.module import Sequential
from ndtrain.engine import losses
from ndtrain.launch.config import ConfigError, model_options
from ndtrain.launch.models import register_model
from ndtrain.cluster.job import TaskModel
from ndtrain.engine.layers import activations as A
from ndtrain.engine.layers.dropout import Dropout
from ndtrain.engine import init

DEFAULTS = {"hidden": [64, 64], "activation": "relu", "dropout": 0.0, "binary_single_logit": True}


def _activation(name: str):
    table = {"relu": A.ReLU, "tanh": A.Tanh, "sigmoid": A.Sigmoid, "gelu": A.GELU, "leaky_relu": A.LeakyReLU,
             "silu": A.SiLU}
    if name not in table:
        raise ConfigError(f"model.activation: must be one of {', '.join(table)}; got {name!r}")
    return table[name]()


def build_mlp(d_in: int, hidden: list[int], d_out: int, activation: str = "relu", dropout: float = 0.0):
    """Linear -> act (-> dropout) ... -> Linear: x (B, d_in) -> logits / predictions (B, d_out)."""
    layers, d = [], d_in
    for h in hidden:
        layers += [Linear(d, h), _activation(activation)]
        if dropout > 0:
            layers.append(Dropout(dropout))
        d = h
    layers.append(Linear(d, d_out))
    return Sequential(*layers)


def _scaled(grad: np.ndarray):
    """grad_fn(scale) for a loss whose gradient (of the sum) is already computed: scales it in place, once."""
    def grad_fn(scale: float) -> np.ndarray:
        np.multiply(grad, grad.dtype.type(scale), out=grad)
        return grad
    return grad_fn


class MLPModel(TaskModel):
    """kind "classification": loss = cross-entropy (softmax, or sigmoid when single_logit), metrics loss, accuracy;
    kind "regression": loss = squared error summed over the K target values, count = B*K, metrics loss = mse."""

    def __init__(self, module, kind: str, single_logit: bool = False):
        self.module = module
        self.kind = kind
        self.single_logit = single_logit

    def _forward(self, x, train):
        return self.module(np.asarray(x, dtype=self.module.dtype), train=train)

    def loss(self, batch, *, train):
        out, backward = self._forward(batch["x"], train)  # (B, d_out)
        y = batch["y"]
        if self.kind == "regression":
            target = np.asarray(y, dtype=out.dtype).reshape(out.shape)
            loss_sum, grad, count = losses.mse(out, target, reduction="sum")  # grad: of the sum
            grad_fn = _scaled(grad)
        elif self.single_logit:
            target = np.asarray(y, dtype=out.dtype).reshape(out.shape)  # (B, 1) in {0, 1}
            loss_sum, grad, count = losses.bce_with_logits(out, target, reduction="sum")
            grad_fn = _scaled(grad)
        else:
            loss_sum, count, grad_fn = losses.cross_entropy_fused(out, np.asarray(y))

        def model_backward(scale: float) -> None:
            backward(grad_fn(scale))

        return loss_sum, count, model_backward

    def predict(self, x) -> np.ndarray:
        """Eval mode: class ids (B,) for classification, predictions (B, K) for regression."""
        out, _ = self._forward(x, False)
        if self.kind == "regression":
            return out
        if self.single_logit:
            return (out[:, 0] > 0).astype(np.int64)
        return out.argmax(axis=1)

    def metric_sums(self, batch):
        out, _ = self._forward(batch["x"], False)
        y = batch["y"]
        if self.kind == "regression":
            target = np.asarray(y, dtype=out.dtype).reshape(out.shape)
            loss_sum, _, count = losses.mse(out, target, reduction="sum")
            return {"loss_sum": loss_sum, "count": float(count)}
        if self.single_logit:
            target = np.asarray(y, dtype=out.dtype).reshape(out.shape)
            loss_sum, _, count = losses.bce_with_logits(out, target, reduction="sum")
            pred = (out[:, 0] > 0).astype(np.int64)
        else:
            loss_sum, count, _ = losses.cross_entropy_fused(out, np.asarray(y))
            pred = out.argmax(axis=1)
        return {"loss_sum": loss_sum, "count": float(count), "correct": float(np.sum(pred == np.asarray(y)))}

    def finalize(self, sums):
        n = max(sums["count"], 1.0)
        loss = sums["loss_sum"] / n
        if self.kind == "regression":
            return {"loss": loss, "mse": loss}
        return {"loss": loss, "accuracy": sums["correct"] / n}


@register_model("mlp")
def mlp(task_info, cfg) -> MLPModel:
    """cfg: the [model] table (a dict) or a launch.config.Config (its .model is used)."""
    table = cfg.model if hasattr(cfg, "model") else (cfg or {})
    opts = model_options(table, DEFAULTS, "mlp")
    if task_info.kind not in ("classification", "regression"):
        raise ConfigError(f"run.model: 'mlp' needs a vector task (classification or regression); task "
                          f"{task_info.name!r} is {task_info.kind}")
    if any(h < 1 for h in opts["hidden"]):
        raise ConfigError(f"model.hidden: widths must be >= 1, got {opts['hidden']}")
    if not 0.0 <= opts["dropout"] < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {opts['dropout']}")
    single = task_info.kind == "classification" and task_info.n_outputs == 2 and opts["binary_single_logit"]
    d_out = 1 if single else task_info.n_outputs
    module = build_mlp(task_info.n_features, opts["hidden"], d_out, opts["activation"], opts["dropout"])
    return MLPModel(module, task_info.kind, single_logit=single)


# -- the perceptron, through the same loop ---------------------------------------------------------------------------
class PerceptronModel(TaskModel):
    """Rosenblatt's linear threshold unit, yhat = [x w + b > 0], for two classes, trained by the loop.

    Loss: the perceptron criterion, per example (yhat - y) z with z = x w + b: zero when correct, |z| when wrong.
    Its gradient w.r.t. z is (yhat - y) (yhat is piecewise constant), so one step of SGD with learning rate lr is
    w += lr / B * sum (y - yhat) x: the perceptron rule summed over the batch (batch size 1: the classic rule).
    It converges on linearly separable data and never on XOR. (engine.layers.perceptron.Perceptron is the
    sample-by-sample version with its own fit loop.)"""

    def __init__(self, module):
        self.module = module

    def _z(self, x, train):
        z, backward = self.module(np.asarray(x, dtype=self.module.dtype), train=train)  # (B, 1)
        return z, backward

    def loss(self, batch, *, train):
        z, backward = self._z(batch["x"], train)
        y = np.asarray(batch["y"]).reshape(z.shape).astype(z.dtype)
        err = (z > 0).astype(z.dtype) - y  # (B, 1): yhat - y in {-1, 0, 1}
        loss_sum = float(np.sum(err * z, dtype=np.float64))

        def model_backward(scale: float) -> None:
            backward(err * z.dtype.type(scale))

        return loss_sum, int(z.shape[0]), model_backward

    def predict(self, x) -> np.ndarray:
        return (self._z(x, False)[0][:, 0] > 0).astype(np.int64)

    def metric_sums(self, batch):
        z, _ = self._z(batch["x"], False)
        y = np.asarray(batch["y"])
        yhat = (z[:, 0] > 0).astype(np.int64)
        return {"loss_sum": float(np.sum((yhat - y) * z[:, 0], dtype=np.float64)), "count": float(len(y)),
                "correct": float(np.sum(yhat == y))}

    def finalize(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}


@register_model("perceptron")
def perceptron(task_info, cfg) -> PerceptronModel:
    """Binary classification only; weights start at zero, as in Rosenblatt's rule. Train with optim.name = "sgd"."""
    table = cfg.model if hasattr(cfg, "model") else (cfg or {})
    model_options(table, {}, "perceptron")  # no hyper-parameters: any key is an error naming it
    if task_info.kind != "classification" or task_info.n_outputs != 2:
        raise ConfigError(f"run.model: 'perceptron' needs a two-class task; task {task_info.name!r} is "
                          f"{task_info.kind} with {task_info.n_outputs} outputs")
    return PerceptronModel(Sequential(Linear(task_info.n_features, 1, w_init=init.zeros(), b_init=init.zeros())))
