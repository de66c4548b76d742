"""Recurrent layers with hand-written BPTT: RNN (tanh), LSTM, GRU; multi-layer, bidirectional, padding-aware."""
from .attention import AdditiveAttention, DotAttention
from .base import RecurrentDirection
from .gru import GRU, GRUDirection
from .lstm import LSTM, LSTMDirection
from .rnn import RNN, RNNDirection
from .stack import RecurrentStack

__all__ = ["RNN", "LSTM", "GRU", "RecurrentStack", "RecurrentDirection", "RNNDirection", "LSTMDirection",
           "GRUDirection", "AdditiveAttention", "DotAttention"]
