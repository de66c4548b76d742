"""Rosenblatt's perceptron (1958): a linear threshold unit trained by the perceptron rule, NOT by backprop."""
from __future__ import annotations

import numpy as np

from ..module import Module


class Perceptron(Module):
    """x: (N, d_in) -> yhat: (N,) in {0, 1}, yhat = step(x w + b) with step(z) = 1 if z > 0 else 0.

    Learning rule, one sample at a time: w += lr (y - yhat) x, b += lr (y - yhat). It converges on linearly
    separable data (the perceptron convergence theorem) and never on XOR (Minsky & Papert 1969).

    The step has zero derivative almost everywhere, so the unit is not trained by backprop: w and b are buffers
    (saved with the model, never in the gradient buffer), and the backward returned by forward raises.
    """

    def __init__(self, d_in: int, lr: float = 1.0, seed: int = 0):
        super().__init__()
        self.d_in, self.lr = d_in, lr
        self.register_buffer("w", np.zeros(d_in))
        self.register_buffer("b", np.zeros(1))
        self.rng = np.random.default_rng(seed)  # sample order in fit; reseeded by engine.module.seed_rngs

    def predict(self, x) -> np.ndarray:
        """x: (N, d_in) -> (N,) int64 in {0, 1}."""
        x = np.asarray(x, dtype=np.float64)
        return (x @ self.w + self.b[0] > 0).astype(np.int64)

    def forward(self, x, *, train: bool):
        def backward(dy):
            raise NotImplementedError("Perceptron is trained by the perceptron rule (fit), not by backprop: "
                                      "the step function has no useful gradient")

        return self.predict(x), backward

    def fit(self, x, y, epochs: int = 10, shuffle: bool = True) -> list[int]:
        """x: (N, d_in), y: (N,) in {0, 1}. Returns the number of misclassified samples seen in each epoch (0 means
        that epoch made no update)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        if x.ndim != 2 or x.shape[1] != self.d_in or y.shape != (x.shape[0],):
            raise ValueError(f"Perceptron.fit: x must be (N, {self.d_in}) and y (N,), got {x.shape} and {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("Perceptron.fit: labels must be 0 or 1")
        errors = []
        for _ in range(epochs):
            order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))
            n_err = 0
            for i in order:
                yhat = 1 if x[i] @ self.w + self.b[0] > 0 else 0
                if yhat != y[i]:
                    n_err += 1
                    step = self.lr * (y[i] - yhat)
                    self.w += step * x[i]  # in place: w is a registered buffer
                    self.b += step
            errors.append(n_err)
        return errors
