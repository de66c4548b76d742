"""Optimizers over the flat ParamStore buffers (one per file) and explicit L1/L2 penalties; see base.py."""
from .adagrad import Adagrad
from .adam import Adam
from .adamw import AdamW
from .base import Optimizer
from .penalties import l1_penalty, l2_penalty
from .rmsprop import RMSprop
from .sgd import SGD

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "adagrad": Adagrad, "rmsprop": RMSprop}

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "l1_penalty", "l2_penalty", "OPTIMIZERS"]
