"""Transformer layers and models with hand-written backprop.

    from ndtrain.engine.transformer import Seq2SeqTransformer, Seq2SeqConfig, DecoderLM, DecoderLMConfig

Names resolve lazily (PEP 562): importing the package costs nothing until a name is used.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "PositionWiseFFN": "ffn",
    "LayerNorm": "norm", "RMSNorm": "norm", "make_norm": "norm",
    "TokenEmbedding": "embedding", "LearnedPositionalEmbedding": "positional",
    "SinusoidalPositionalEncoding": "positional", "make_positional": "positional",
    "EncoderBlock": "blocks", "DecoderBlock": "blocks",
    "InputEmbedding": "stacks", "Encoder": "stacks", "Decoder": "stacks",
    "TransformerConfig": "config", "Seq2SeqConfig": "config", "DecoderLMConfig": "config",
    "EncoderClassifierConfig": "config",
    "Seq2SeqTransformer": "seq2seq", "DecoderLM": "lm", "EncoderClassifier": "classifier",
    "FeatureTokenClassifier": "feature_classifier",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ndtrain.engine.transformer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
