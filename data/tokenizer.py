"""Tokenizers: char-level, word-level and BPE (HF `tokenizers`), all with PAD=0 UNK=1 BOS=2 EOS=3.

Every tokenizer saves to one JSON file (never pickle) beside the shards; `load_tokenizer(path)` reads any of them.
Char/word files are our own tiny format `{"ndtrain_tokenizer": "char"|"word", "tokens": [...]}` (ids = positions);
BPE files are HF's own `tokenizer.json`. `encode` returns ids WITHOUT BOS/EOS (the loader adds them).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from .info import BOS, EOS, PAD, UNK

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # index = id
assert [SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS] == [PAD, UNK, BOS, EOS]
N_SPECIAL = len(SPECIAL_TOKENS)


class Tokenizer:
    kind: str

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """text -> (L,) int32 ids (no BOS/EOS)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; special ids (PAD/BOS/EOS) are dropped, decoding stops at the first EOS."""
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @staticmethod
    def _strip(ids: Iterable[int]) -> list[int]:
        out = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(int(i))
        return out


class _TableTokenizer(Tokenizer):
    """Shared code of the char and word tokenizers: a token table, ids = positions (specials first)."""

    def __init__(self, tokens: list[str]):
        if tokens[:N_SPECIAL] != SPECIAL_TOKENS:
            tokens = SPECIAL_TOKENS + [t for t in tokens if t not in SPECIAL_TOKENS]
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _ids(self, pieces: Iterable[str]) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(p, UNK) for p in pieces), dtype=np.int32)

    def to_json(self) -> str:
        return json.dumps({"ndtrain_tokenizer": self.kind, "tokens": self.tokens}, ensure_ascii=False)


class CharTokenizer(_TableTokenizer):
    kind = "char"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        """Characters by frequency (ties by code point), cut to vocab_size including the 4 specials."""
        counts = Counter()
        for t in texts:
            counts.update(t)
        chars = sorted(counts, key=lambda c: (-counts[c], c))
        if vocab_size is not None:
            chars = chars[: max(0, vocab_size - N_SPECIAL)]
        return cls(SPECIAL_TOKENS + sorted(chars))

    @classmethod
    def from_alphabet(cls, alphabet: str) -> "CharTokenizer":
        return cls(SPECIAL_TOKENS + sorted(set(alphabet)))

    def encode(self, text: str) -> np.ndarray:
        return self._ids(text)

    def decode(self, ids) -> str:
        return "".join(self.tokens[i] if i < len(self.tokens) else self.tokens[UNK] for i in self._strip(ids))


class WordTokenizer(_TableTokenizer):
    """Whitespace-separated words; decode joins with one space (so round trips hold for normalized spacing)."""

    kind = "word"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "WordTokenizer":
        counts = Counter()
        for t in texts:
            counts.update(t.split())
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            words = words[: max(0, vocab_size - N_SPECIAL)]
        return cls(SPECIAL_TOKENS + words)

    def encode(self, text: str) -> np.ndarray:
        return self._ids(text.split())

    def decode(self, ids) -> str:
        return " ".join(self.tokens[i] if i < len(self.tokens) else self.tokens[UNK] for i in self._strip(ids))


class BpeTokenizer(Tokenizer):
    """Byte-level BPE from HF `tokenizers`: lossless round trip of any text; specials fixed at ids 0-3."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        for i, t in enumerate(SPECIAL_TOKENS):
            if self.hf.token_to_id(t) != i:
                raise ValueError(f"BPE tokenizer: special token {t!r} must have id {i}, has {self.hf.token_to_id(t)}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000) -> "BpeTokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode(self._strip(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.hf.to_str()


KINDS = {"char": CharTokenizer, "word": WordTokenizer, "bpe": BpeTokenizer}
# byte-level BPE starts from the 256-byte alphabet plus the 4 specials: a smaller vocabulary cannot be honoured
BPE_MIN_VOCAB = 256 + N_SPECIAL


def check_vocab_size(kind: str, vocab_size: int | None) -> None:
    """ValueError naming the minimum when `vocab_size` cannot be honoured by tokenizer `kind`."""
    if vocab_size is None:
        return
    least = BPE_MIN_VOCAB if kind == "bpe" else N_SPECIAL + 1
    if vocab_size < least:
        why = "the 256-byte alphabet + 4 special tokens" if kind == "bpe" else "4 special tokens + at least one"
        raise ValueError(f"vocab_size: the {kind} tokenizer needs at least {least} ({why}), got {vocab_size}")


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}; choose one of {sorted(KINDS)}")
    check_vocab_size(kind, vocab_size)
    if kind == "bpe":
        return BpeTokenizer.train(texts, vocab_size or 1000)
    return KINDS[kind].train(texts, vocab_size)


def tokenizer_from_json(text: str, *, source: str = "<string>") -> Tokenizer:
    """Any saved tokenizer. The file is untrusted: every way it can be malformed is a ValueError naming `source`
    (and the field), never a KeyError / TypeError / the HF library's own exception."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not a tokenizer JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: not a tokenizer file (a JSON object expected, got {type(obj).__name__})")
    kind = obj.get("ndtrain_tokenizer")
    if kind is not None:
        if kind not in ("char", "word"):
            raise ValueError(f"{source}: field 'ndtrain_tokenizer' must be 'char' or 'word', got {kind!r}")
        tokens = obj.get("tokens")
        if tokens is None:
            raise ValueError(f"{source}: field 'tokens' missing")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{source}: field 'tokens' must be a list of strings, got {type(tokens).__name__}")
        if len(set(tokens)) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if t in tokens[:i])
            raise ValueError(f"{source}: field 'tokens' lists {dup!r} twice (ids would be ambiguous)")
        return KINDS[kind](tokens)
    if "model" in obj:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception for any malformed file
            msg = " ".join(str(e).split())
            raise ValueError(f"{source}: not a valid HF tokenizers file ({msg})") from None
        try:
            return BpeTokenizer(hf)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    raise ValueError(f"{source}: unknown tokenizer format (neither 'ndtrain_tokenizer' nor an HF 'model')")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer file; ValueError naming the path when it is missing, not a file, not UTF-8 or malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such tokenizer file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a tokenizer file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the tokenizer file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a tokenizer file (not UTF-8 text at byte {e.start})") from None
    return tokenizer_from_json(text, source=str(path))
