"""What a model builder needs to know about a task (shared by data/, launch/models and the trainer)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = ("classification", "regression", "seq2seq", "lm")

# Fixed special token ids, for every tokenizer.
PAD, UNK, BOS, EOS = 0, 1, 2, 3


@dataclass
class TaskInfo:
    name: str
    kind: str  # one of KINDS
    n_features: int = 0  # vector tasks: width of x
    n_outputs: int = 0  # classification: number of classes; regression: width of y
    src_vocab_size: int = 0  # seq2seq
    tgt_vocab_size: int = 0  # seq2seq; for lm the vocabulary size
    max_src_len: int = 0
    max_tgt_len: int = 0  # lm: block (context) length
    extra: dict = field(default_factory=dict)  # task-specific (e.g. tokenizer file)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TaskInfo.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def vocab_size(self) -> int:
        return self.tgt_vocab_size

    def to_dict(self) -> dict:
        return asdict(self)
