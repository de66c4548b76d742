"""RNN encoder-decoder as a TaskModel: "seq2seq-rnn" (engine/seq2seq_rnn.py), for the seq2seq tasks.

    [model]                      # defaults
    cell = "gru"                 # gru | lstm
    attention = "none"           # none (the context bottleneck) | bahdanau (additive) | luong (dot)
    hidden_size = 128
    num_layers = 1
    d_embed = 64
    d_attn = 0                   # bahdanau's tanh width; 0 -> hidden_size
    label_smoothing = 0.0
    eval_beam_size = 1           # exact match decodes greedily (1) or with beam search
    length_penalty = 0.6

Loss, metrics and decoding are the Transformer's (launch/models/transformer.Seq2SeqModel): the same teacher-forced
cross-entropy over real target tokens and the same exact match of greedy/beam decodes, so the two families are
compared on equal terms.
"""
from __future__ import annotations

from ndtrain.data.info import PAD
from ndtrain.engine.seq2seq_rnn import Seq2SeqRNN, Seq2SeqRNNConfig
from ndtrain.launch.config import ConfigError, model_options
from ndtrain.launch.models import register_model
from ndtrain.launch.models.transformer import Seq2SeqModel

DEFAULTS = {"cell": "gru", "attention": "none", "hidden_size": 128, "num_layers": 1, "d_embed": 64, "d_attn": 0,
            "label_smoothing": 0.0, "eval_beam_size": 1, "length_penalty": 0.6}


@register_model("seq2seq-rnn")
def seq2seq_rnn(task_info, cfg) -> Seq2SeqModel:
    """cfg: the [model] table (a dict) or a launch.config.Config (its .model is used)."""
    table = cfg.model if hasattr(cfg, "model") else (cfg or {})
    opts = model_options(table, DEFAULTS, "seq2seq-rnn")
    if task_info.kind != "seq2seq":
        raise ConfigError(f"run.model: 'seq2seq-rnn' needs a seq2seq task; task {task_info.name!r} is "
                          f"{task_info.kind}")
    try:
        mcfg = Seq2SeqRNNConfig(src_vocab_size=task_info.src_vocab_size, tgt_vocab_size=task_info.tgt_vocab_size,
                                d_embed=opts["d_embed"], hidden_size=opts["hidden_size"],
                                num_layers=opts["num_layers"], cell=opts["cell"], attention=opts["attention"],
                                d_attn=opts["d_attn"], pad_id=PAD)
    except ValueError as e:  # name the config field, not the dataclass
        raise ConfigError(str(e).replace("Seq2SeqRNNConfig.", "model.")) from None
    return Seq2SeqModel(Seq2SeqRNN(mcfg), label_smoothing=opts["label_smoothing"],
                        eval_beam_size=opts["eval_beam_size"], length_penalty=opts["length_penalty"],
                        max_decode_len=task_info.max_tgt_len or None)
