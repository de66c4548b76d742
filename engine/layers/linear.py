"""Linear: y = x W + b, with W stored (in, out) so the forward is one GEMM with no transpose."""
from __future__ import annotations

from .. import init as initializers
from .. import kernels
from ..module import Module
from ..params import Param


class Linear(Module):
    """x: (..., d_in) -> y: (..., d_out).

    Default init is PyTorch's (uniform +-1/sqrt(d_in) for W and b), so results can be compared with nn.Linear.
    input_grad=False is for a first layer whose input is data: the backward skips the (N, d_out) x (d_out, d_in)
    GEMM for dx and returns None (as autograd does for inputs that need no gradient).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True, w_init=None, b_init=None, input_grad: bool = True):
        super().__init__()
        self.d_in, self.d_out, self.input_grad = d_in, d_out, bool(input_grad)
        self.W = Param((d_in, d_out), w_init or initializers.torch_linear_default(d_in), decay=True)
        self.b = Param((d_out,), b_init or initializers.torch_linear_default(d_in), decay=False) if bias else None

    def forward(self, x, *, train: bool):
        W, b, input_grad = self.W, self.b, self.input_grad
        y = x @ W.data  # (..., d_out)
        if b is not None:
            kernels.add_row_(y, b.data)

        def backward(dy):
            x2 = x.reshape(-1, self.d_in)  # (N, d_in)
            dy2 = dy.reshape(-1, self.d_out)  # (N, d_out)
            W.grad += x2.T @ dy2  # (d_in, d_out)
            if b is not None:
                b.grad += kernels.col_sum(dy2)  # a gemv: faster than dy2.sum(axis=0)
            return dy @ W.data.T if input_grad else None  # (..., d_in)

        return y, backward
