"""Transformer families as TaskModels: "transformer" (encoder-decoder, seq2seq tasks), "lm" (decoder-only, GPT
style) and "classifier" (encoder with a pooled head).

    [model]                        # "transformer" defaults (see DEFAULTS for "lm" and "classifier")
    d_model = 128
    n_heads = 4
    d_ff = 512
    n_enc_layers = 2
    n_dec_layers = 2
    dropout = 0.1                  # residual and embedding dropout; attn_dropout defaults to it
    activation = "gelu"            # relu | gelu | swiglu
    norm = "layer"                 # layer | rms
    norm_placement = "pre"         # pre (GPT-2, Xiong et al.) | post (Vaswani et al.)
    positional = "sinusoidal"      # sinusoidal | learned
    scale_embedding = false        # token embeddings times sqrt(d_model)
    share_embeddings = false       # one embedding for source and target (same vocabulary)
    tie_output = true              # output projection = target embedding^T
    label_smoothing = 0.0
    eval_beam_size = 1             # eval decodes (exact match, BLEU) greedily (1) or with beam search
    length_penalty = 0.6           # alpha of that beam search's length penalty (engine.decoding.length_penalty)
    length_penalty_kind = "gnmt"   # gnmt ((5 + len) / 6) ** alpha | fairseq len ** alpha (its --lenpen)
    eval_bleu = true               # BLEU in every eval when the tokenizer is word or BPE level

The keys are the fields of the engine's config dataclasses (engine/transformer/config.py) plus the adapter's own
(label_smoothing, eval_beam_size, length_penalty, length_penalty_kind, eval_bleu, block_size); vocabulary sizes
and max_len come from TaskInfo.

Batches (cluster/job.py): seq2seq src/tgt_in/tgt_out, lm x/y, classification x/y. PAD (0) targets are
ignored by the loss and every metric. The engine module maps ids to logits:
  seq2seq     module(src, tgt_in) -> (logits (B, T, V), backward); also an IncrementalDecoder (start/step/reorder)
  lm          module(x) -> (logits (B, T, V), backward); an IncrementalDecoder too (src = None)
  classifier  module(x) -> (logits (B, C), backward); x (B, T) token ids (EncoderClassifier) or (B, F) float
              features (engine.transformer.FeatureTokenClassifier)
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from ndtrain.data.info import PAD, TaskInfo
from ndtrain.engine import decoding, losses, metrics
from ndtrain.engine.cross_entropy import xent_rows_argmax
from ndtrain.cluster.job import TaskModel
from ndtrain.engine.transformer import (DecoderLM, DecoderLMConfig, EncoderClassifier, EncoderClassifierConfig,
                                        FeatureTokenClassifier, Seq2SeqConfig, Seq2SeqTransformer)
from ndtrain.launch.config import ConfigError, model_options
from ndtrain.launch.models import register_model

_COMMON = {"d_model": 128, "n_heads": 4, "d_ff": 512, "dropout": 0.1, "attn_dropout": None, "activation": "gelu",
           "norm": "layer", "norm_placement": "pre", "scale_embedding": False, "label_smoothing": 0.0}
DEFAULTS = {
    "transformer": {**_COMMON, "positional": "sinusoidal", "n_enc_layers": 2, "n_dec_layers": 2,
                    "share_embeddings": False, "tie_output": True, "eval_beam_size": 1, "length_penalty": 0.6,
                    "length_penalty_kind": "gnmt", "eval_bleu": True},
    # nanoGPT's small CPU configuration for shakespeare_char (no dropout)
    "lm": {**_COMMON, "dropout": 0.0, "positional": "learned", "n_layers": 4, "tie_embeddings": True,
           "block_size": 0},  # block_size 0: the task's context length (TaskInfo.max_tgt_len)
    "classifier": {**_COMMON, "positional": "learned", "n_layers": 2, "pooling": "mean"},
}


def _model_table(cfg) -> dict:
    """cfg: a launch.config.Config (its [model] table is used), a plain dict, or None."""
    table = cfg.model if hasattr(cfg, "model") else cfg
    if dataclasses.is_dataclass(table):
        table = dataclasses.asdict(table)
    return dict(table or {})


def _options(cfg, family: str) -> dict:
    return model_options(_model_table(cfg), DEFAULTS[family], family)


def _ids(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int32)


def _scaled_backward(module_backward, grad_fn):
    def backward(scale: float) -> None:
        module_backward(grad_fn(scale))
    return backward


def _finalize_tokens(sums: dict) -> dict:
    n = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums["loss_sum"] / n, "perplexity": metrics.perplexity(sums["loss_sum"], n)}
    if "correct" in sums:
        out["token_accuracy"] = sums["correct"] / n
    return out


# -- seq2seq ----------------------------------------------------------------------------------------------------------
class Seq2SeqModel(TaskModel):
    """Teacher-forced cross-entropy summed over the real (non-PAD) target tokens; eval adds the exact match of
    greedy (or beam) decodes made through the IncrementalDecoder protocol and, with a word or BPE tokenizer
    (set_tokenizer), the corpus BLEU of the same decodes: one decode per batch serves every metric."""
    reports_padding = True  # pad_fraction of the source + decoder-input positions

    def __init__(self, module, label_smoothing: float = 0.0, eval_beam_size: int = 1, length_penalty: float = 0.6,
                 max_decode_len: int | None = None, length_penalty_kind: str = "gnmt", eval_bleu: bool = True):
        self.module = module
        self.label_smoothing = float(label_smoothing)
        self.eval_beam_size = int(eval_beam_size)
        self.length_penalty = float(length_penalty)
        self.length_penalty_kind = length_penalty_kind
        self.max_decode_len = max_decode_len
        self.eval_bleu = bool(eval_bleu)
        self.detokenize = None  # ids (L,) -> text, set by set_tokenizer when BLEU is computed

    def set_tokenizer(self, tokenizer, bleu: bool | None = None) -> None:
        """BLEU (sacreBLEU's corpus BLEU of the detokenized decodes against the detokenized targets) when bleu is
        True, or when bleu is None, model.eval_bleu is set and the tokenizer is word or BPE level (a char task's
        BLEU would count whole outputs as single words: exact match measures it better)."""
        if bleu is None:
            bleu = self.eval_bleu and getattr(tokenizer, "kind", "") in ("word", "bpe")
        self.detokenize = tokenizer.decode if bleu and tokenizer is not None else None

    def loss(self, batch, *, train):
        src, tgt_in, tgt_out = _ids(batch["src"]), _ids(batch["tgt_in"]), _ids(batch["tgt_out"])
        if train:
            self.note_padding(src, tgt_in, pad=PAD)
        if hasattr(self.module, "loss"):  # the Transformer: output layer and softmax on the real rows only
            return self.module.loss(src, tgt_in, tgt_out, ignore_index=PAD, label_smoothing=self.label_smoothing,
                                    train=train)
        logits, backward = self.module(src, tgt_in, train=train)  # (B, T, V)
        loss_sum, count, grad_fn = losses.cross_entropy_fused(logits, tgt_out, ignore_index=PAD,
                                                              label_smoothing=self.label_smoothing, inplace=True)
        return loss_sum, count, _scaled_backward(backward, grad_fn)

    def decode(self, src: np.ndarray, max_len: int | None = None, beam_size: int | None = None,
               start_state=None) -> np.ndarray:
        """src (B, S) -> generated target ids (B, L) int32, ending in EOS then PAD (eval mode, no gradients).
        start_state: module.start(src), when the caller has encoded src already."""
        max_len = max_len or self.max_decode_len
        if not max_len:
            raise ValueError("Seq2SeqModel.decode: give max_len (or build the model with max_decode_len)")
        beam = self.eval_beam_size if beam_size is None else beam_size
        if beam > 1:
            return decoding.beam_search(self.module, _ids(src), beam_size=beam, max_len=max_len,
                                        alpha=self.length_penalty, penalty=self.length_penalty_kind,
                                        start_state=start_state)[0]
        return decoding.greedy(self.module, _ids(src), max_len=max_len, start_state=start_state)

    # An eval batch is sorted by target length (then source length) and cut into chunks of at most EVAL_CHUNK_TOKENS
    # decoder positions and EVAL_CHUNK_ROWS rows, each trimmed to its own longest source and target: the forward
    # and the decode compute (almost) nothing on padding (the decoder and the output layer, the larger part, see ~5%
    # padding on Multi30k's validation rows), the activations of a chunk stay in cache, and the sums do not depend on
    # the chunking.
    EVAL_CHUNK_TOKENS = 2048
    EVAL_CHUNK_ROWS = 128

    def eval_chunks(self, src: np.ndarray, tgt_out: np.ndarray) -> list[np.ndarray]:
        """The row indices of each eval chunk of a batch (see EVAL_CHUNK_TOKENS), in chunk order."""
        src_len, tgt_len = (src != PAD).sum(axis=1), (tgt_out != PAD).sum(axis=1)
        order = np.lexsort((src_len, tgt_len))  # by target length, then source length
        t_sorted = np.maximum(tgt_len[order], 1)
        chunks, i, n = [], 0, len(order)
        while i < n:
            j = i + 1  # rows i..j-1; t_sorted is non-decreasing, so the newest row sets the chunk's width
            while j < n and j - i < self.EVAL_CHUNK_ROWS and (j + 1 - i) * t_sorted[j] <= self.EVAL_CHUNK_TOKENS:
                j += 1
            chunks.append(order[i:j])
            i = j
        return chunks

    def metric_sums(self, batch):
        """Forward only (train=False: no layer keeps backward state), then ONE decode for exact match and (with a
        detokenizer) the BLEU statistics; by length-sorted chunks (eval_chunks) trimmed of padding, each source
        encoded once for both."""
        src, tgt_in, tgt_out = _ids(batch["src"]), _ids(batch["tgt_in"]), _ids(batch["tgt_out"])
        src_len, tgt_len = (src != PAD).sum(axis=1), (tgt_out != PAD).sum(axis=1)
        out: dict[str, float] = {}
        for rows in self.eval_chunks(src, tgt_out):
            S, T = max(1, int(src_len[rows].max())), max(1, int(tgt_len[rows].max()))
            for k, v in self._chunk_sums(src[rows, :S], tgt_in[rows, :T], tgt_out[rows, :T]).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _encodes_once(self) -> bool:
        return all(hasattr(self.module, a) for a in ("encode", "decode_hidden", "start_from", "_logits"))

    def _logits_real(self, src, tgt_in, tgt_out):
        """Logits (N, V) of the N real (non-PAD) target positions only, and their targets (N,): the output layer
        never runs on padding (a model without hidden() falls back to its full forward)."""
        real = tgt_out != PAD
        if hasattr(self.module, "hidden") and hasattr(self.module, "_logits"):
            h, _ = self.module.hidden(src, tgt_in, train=False)  # (B, T, D)
            return self.module._logits(h[real]), tgt_out[real]
        logits, _ = self.module(src, tgt_in, train=False)  # (B, T, V)
        return logits[real], tgt_out[real]

    def teacher_forced_sums(self, src, tgt_in, tgt_out, memory=None) -> dict[str, float]:
        """loss_sum, count and correct (argmax == target) of the teacher-forced forward over one chunk, the output
        layer on the real target rows only; memory: (memory, cross_mask) of module.encode(src), if at hand."""
        real = tgt_out != PAD
        if memory is not None:
            h, _ = self.module.decode_hidden(*memory, tgt_in, train=False)  # (B, T, D)
            logits, targets = self.module._logits(h[real]), tgt_out[real]  # (N, V), (N,)
            del h
        else:
            logits, targets = self._logits_real(src, tgt_in, tgt_out)
        # the loss and the argmax in one blocked pass over the logits (engine.cross_entropy.xent_rows_argmax)
        per, pred = xent_rows_argmax(logits, targets)
        return {"loss_sum": float(per.sum()), "count": float(len(targets)),
                "correct": float(np.count_nonzero(pred == targets))}

    def _chunk_sums(self, src, tgt_in, tgt_out) -> dict[str, float]:
        memory = start_state = None
        if self._encodes_once():  # the source is encoded once, for the teacher-forced pass and the decode
            memory = self.module.encode(src, train=False)[:2]  # (memory (B, S, D), cross_mask)
        out = self.teacher_forced_sums(src, tgt_in, tgt_out, memory)
        if memory is not None:
            start_state = self.module.start_from(*memory)
            memory = None
        # A correct output ends with EOS within the chunk's target width, so exact match never needs a longer
        # decode; BLEU scores the whole translation, so then decoding runs up to the task's longest target.
        max_len = tgt_out.shape[1]
        if self.detokenize is not None:
            max_len = max(max_len, self.max_decode_len or 0)
        pred = self.decode(src, max_len=max_len, start_state=start_state)
        exact = metrics.sequence_exact_match(pred, tgt_out)
        out.update({"exact": float(exact.sum()), "n_seq": float(tgt_out.shape[0])})
        if self.detokenize is not None:
            hyps = [self.detokenize(row) for row in pred]
            refs = [self.detokenize(row) for row in tgt_out]
            out.update(metrics.bleu_sums(hyps, refs))
        return out

    def finalize(self, sums):
        out = _finalize_tokens(sums)
        out["exact_match"] = sums["exact"] / max(sums.get("n_seq", 0.0), 1.0)
        if "bleu_sys_len" in sums:
            out["bleu"] = metrics.bleu_from_sums(sums).score
        return out


# -- language model ---------------------------------------------------------------------------------------------------
class LMModel(TaskModel):
    """Next-token cross-entropy summed over the real positions of y; metrics loss, perplexity, token accuracy."""
    reports_padding = True

    def __init__(self, module, block_size: int, label_smoothing: float = 0.0):
        self.module = module
        self.block_size = int(block_size)
        self.label_smoothing = float(label_smoothing)

    def loss(self, batch, *, train):
        x, y = _ids(batch["x"]), _ids(batch["y"])
        if train:
            self.note_padding(x, pad=PAD)
        return self.module.loss(x, y, ignore_index=PAD, label_smoothing=self.label_smoothing, train=train)

    # Tokens per forward in eval: a large eval batch is run in chunks of this many tokens, so every activation of
    # the forward stays in cache (measured on the tinyshakespeare model: chunks of 2k-4k tokens evaluate ~1.8x
    # faster than one 64k-token forward); the sums do not depend on the chunking.
    EVAL_CHUNK_TOKENS = 4096

    def metric_sums(self, batch):
        """Forward only (train=False), by chunks of EVAL_CHUNK_TOKENS tokens."""
        x, y = _ids(batch["x"]), _ids(batch["y"])
        rows = max(1, self.EVAL_CHUNK_TOKENS // max(1, x.shape[1]))
        out = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        for r0 in range(0, x.shape[0], rows):
            yc = y[r0:r0 + rows]
            logits, _ = self.module(x[r0:r0 + rows], train=False)
            correct, count = metrics.token_accuracy_sums(logits, yc)
            loss_sum, _, _ = losses.cross_entropy_fused(logits, yc, ignore_index=PAD, inplace=True)
            out["loss_sum"] += float(loss_sum)
            out["count"] += float(count)
            out["correct"] += float(correct)
        return out

    def finalize(self, sums):
        return _finalize_tokens(sums)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, rng=None, eos: int | None = None):
        """prompt (B, P) ids -> (B, max_new_tokens) sampled ids. The context slides over the last block_size
        tokens (learned positions stop there). eos=None never stops early (a char LM has no EOS)."""
        return decoding.sample(self.module, prefix=_ids(prompt), max_len=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, rng=rng, eos=-1 if eos is None else eos,
                               window=self.block_size)


# -- classifier -------------------------------------------------------------------------------------------------------
class ClassifierModel(TaskModel):
    """Cross-entropy over classes, one term per example; metrics loss and accuracy."""

    def __init__(self, module, label_smoothing: float = 0.0):
        self.module = module
        self.label_smoothing = float(label_smoothing)

    def _forward(self, x, train):
        x = np.asarray(x)
        x = x.astype(self.module.dtype) if np.issubdtype(x.dtype, np.floating) else _ids(x)
        return self.module(x, train=train)  # (B, C)

    def loss(self, batch, *, train):
        logits, backward = self._forward(batch["x"], train)
        loss_sum, count, grad_fn = losses.cross_entropy_fused(logits, np.asarray(batch["y"]),
                                                              label_smoothing=self.label_smoothing, inplace=True)
        return loss_sum, count, _scaled_backward(backward, grad_fn)

    def metric_sums(self, batch):
        y = np.asarray(batch["y"])
        logits, _ = self._forward(batch["x"], False)
        correct = int(np.count_nonzero(logits.argmax(axis=-1) == y))
        loss_sum, count, _ = losses.cross_entropy_fused(logits, y, inplace=True)
        return {"loss_sum": loss_sum, "count": float(count), "correct": float(correct)}

    def finalize(self, sums):
        n = max(sums.get("count", 0.0), 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}


# -- builders ---------------------------------------------------------------------------------------------------------
def _config(cls, values: dict):
    """An engine config dataclass from our option names, validated; keys the class does not have are dropped (so the
    [model] table may carry adapter-only keys such as eval_beam_size). Its errors name the model.* field."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in values.items() if k in names}).validate()
    except ValueError as e:
        raise ConfigError(re.sub(r"^\w+Config\.", "model.", str(e))) from None


def _check_kind(info: TaskInfo, family: str, kinds: tuple) -> None:
    if info.kind not in kinds:
        raise ConfigError(f"run.model: {family!r} needs a {' or '.join(kinds)} task; task {info.name!r} is "
                         f"{info.kind}")


def _engine_options(opts: dict) -> dict:
    out = dict(opts)
    if out["d_model"] % out["n_heads"]:
        raise ConfigError(f"model.n_heads: must divide model.d_model={out['d_model']}, got {out['n_heads']}")
    return out


@register_model("transformer")
def build_transformer(task_info: TaskInfo, cfg) -> Seq2SeqModel:
    _check_kind(task_info, "transformer", ("seq2seq",))
    opts = _engine_options(_options(cfg, "transformer"))
    mc = _config(Seq2SeqConfig, {**opts, "src_vocab": task_info.src_vocab_size, "tgt_vocab": task_info.tgt_vocab_size,
                                 "max_len": max(task_info.max_src_len, task_info.max_tgt_len)})
    if opts["length_penalty_kind"] not in ("gnmt", "fairseq"):
        raise ValueError(f"model.length_penalty_kind: must be 'gnmt' or 'fairseq', got {opts['length_penalty_kind']!r}")
    if opts["eval_beam_size"] < 1:
        raise ValueError(f"model.eval_beam_size: must be >= 1, got {opts['eval_beam_size']}")
    return Seq2SeqModel(Seq2SeqTransformer(mc), opts["label_smoothing"], opts["eval_beam_size"],
                        opts["length_penalty"], max_decode_len=task_info.max_tgt_len,
                        length_penalty_kind=opts["length_penalty_kind"], eval_bleu=opts["eval_bleu"])


@register_model("lm")
def build_lm(task_info: TaskInfo, cfg) -> LMModel:
    _check_kind(task_info, "lm", ("lm",))
    opts = _engine_options(_options(cfg, "lm"))
    block = opts["block_size"] or task_info.max_tgt_len
    if task_info.max_tgt_len and block < task_info.max_tgt_len:
        # The loader serves the data's fixed blocks; a shorter context would see positions it has no embedding for.
        raise ConfigError(f"model.block_size: {block} is shorter than the data's blocks of {task_info.max_tgt_len} "
                         f"tokens (set at `ndtrain data import --block-size`); use >= {task_info.max_tgt_len} or 0")
    mc = _config(DecoderLMConfig, {**opts, "vocab_size": task_info.vocab_size, "max_len": block})
    return LMModel(DecoderLM(mc), block, opts["label_smoothing"])


@register_model("classifier")
def build_classifier(task_info: TaskInfo, cfg) -> ClassifierModel:
    _check_kind(task_info, "classifier", ("classification",))
    opts = _engine_options(_options(cfg, "classifier"))
    vocab = task_info.src_vocab_size or task_info.tgt_vocab_size
    if task_info.n_features and not vocab:  # a vector task: one token per feature
        mc = _config(EncoderClassifierConfig, {**opts, "max_len": task_info.n_features})
        module = FeatureTokenClassifier(mc, task_info.n_features, task_info.n_outputs)
        return ClassifierModel(module, opts["label_smoothing"])
    if not vocab or not task_info.max_src_len:
        raise ConfigError(f"run.model: 'classifier' needs token ids (TaskInfo.src_vocab_size and max_src_len) or "
                         f"float features (n_features); task {task_info.name!r} gives neither")
    mc = _config(EncoderClassifierConfig, {**opts, "vocab_size": vocab, "n_classes": task_info.n_outputs,
                                           "max_len": task_info.max_src_len})
    return ClassifierModel(EncoderClassifier(mc), opts["label_smoothing"])


__all__ = ["Seq2SeqModel", "LMModel", "ClassifierModel", "FeatureTokenClassifier", "DEFAULTS", "build_transformer", "build_lm",
           "build_classifier"]
