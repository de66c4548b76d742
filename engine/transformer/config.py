"""Model configurations (data, validated with errors that name the field)."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TransformerConfig:
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1  # residual and embedding dropout
    attn_dropout: float | None = None  # on the attention weights; None: same as dropout
    activation: str = "gelu"  # relu | gelu (tanh approximation) | swiglu
    norm: str = "layer"  # layer | rms
    norm_placement: str = "pre"  # pre (GPT-2, Xiong et al.) | post (Vaswani et al.)
    positional: str = "learned"  # learned | sinusoidal
    max_len: int = 512
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al. 3.4)
    pad_id: int = 0

    @property
    def pre_norm(self) -> bool:
        return self.norm_placement == "pre"

    def validate(self) -> "TransformerConfig":
        name = type(self).__name__
        choices = {"activation": ("relu", "gelu", "swiglu"), "norm": ("layer", "rms"),
                   "norm_placement": ("pre", "post"), "positional": ("learned", "sinusoidal")}
        for f, allowed in choices.items():
            if getattr(self, f) not in allowed:
                raise ValueError(f"{name}.{f}: {getattr(self, f)!r} is not one of {allowed}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("dropout", "attn_dropout") and v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name}.{f.name}: {v} is not in [0, 1)")
            if isinstance(v, int) and not isinstance(v, bool) and f.name != "pad_id" and v <= 0:
                raise ValueError(f"{name}.{f.name}: must be positive, got {v}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{name}.d_model: {self.d_model} is not a multiple of n_heads {self.n_heads}")
        return self


@dataclass
class Seq2SeqConfig(TransformerConfig):
    src_vocab: int = 64
    tgt_vocab: int = 64
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    share_embeddings: bool = False  # one embedding for source and target (needs src_vocab == tgt_vocab)
    tie_output: bool = True  # output projection = target embedding^T (Press & Wolf 2017)

    def validate(self):
        super().validate()
        if self.share_embeddings and self.src_vocab != self.tgt_vocab:
            raise ValueError(f"Seq2SeqConfig.share_embeddings: needs src_vocab == tgt_vocab "
                             f"({self.src_vocab} != {self.tgt_vocab})")
        return self


@dataclass
class DecoderLMConfig(TransformerConfig):
    vocab_size: int = 256
    n_layers: int = 4
    tie_embeddings: bool = True


@dataclass
class EncoderClassifierConfig(TransformerConfig):
    vocab_size: int = 256
    n_classes: int = 2
    n_layers: int = 2
    pooling: str = "mean"  # mean over real tokens | cls (the first token)

    def validate(self):
        super().validate()
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"EncoderClassifierConfig.pooling: {self.pooling!r} is not one of ('mean', 'cls')")
        return self
