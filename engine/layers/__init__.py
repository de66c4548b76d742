"""Layers: each `forward(x, train)` returns `(y, backward)`; see engine.module."""
from .activations import GELU, PReLU, ReLU, LeakyReLU, SiLU, Sigmoid, Softmax, Swish, Tanh
from .batchnorm import BatchNorm
from .dropout import Dropout
from .embedding import Embedding
from .linear import Linear
from .norm import LayerNorm, RMSNorm
from .perceptron import Perceptron
from .swiglu import SwiGLU

__all__ = ["Linear", "ReLU", "LeakyReLU", "PReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "Swish", "Softmax",
           "LayerNorm", "RMSNorm", "Embedding", "Dropout", "BatchNorm", "SwiGLU", "Perceptron"]
