"""Seq2SeqModel.metric_sums (length-sorted chunks trimmed of padding, each source encoded once for the
teacher-forced pass and the decode, loss and argmax in one pass) equals the slow path (float64): one full forward
over the padded batch, cross_entropy_fused, argmax, and a separate beam search / greedy decode of the whole batch."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, decoding, losses, metrics
from ndtrain.engine.decoding import BOS, EOS
from ndtrain.engine.transformer import Seq2SeqConfig, Seq2SeqTransformer
from ndtrain.launch.models.transformer import Seq2SeqModel

V = 15


class _Words:
    kind = "word"

    @staticmethod
    def decode(ids):
        return " ".join(str(int(i)) for i in ids if i > EOS)


def _module(seed=7):
    m = Seq2SeqTransformer(Seq2SeqConfig(d_model=16, n_heads=2, d_ff=24, max_len=24, src_vocab=V, tgt_vocab=V,
                                         n_enc_layers=2, n_dec_layers=2, dropout=0.0, tie_output=False))
    ParamStore.from_module(m, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in m.named_params():  # peaked, distinct choices; EOS likely enough that decodes end at many lengths
        p.data += 0.5 * rng.standard_normal(p.shape)
    m.b_out.data[EOS] += 2.0
    m.eval()
    return m


def _batch(B=40, S=9, T=8, seed=0):
    rng = np.random.default_rng(seed)
    src = np.zeros((B, S), np.int32)
    tgt_out = np.zeros((B, T), np.int32)
    for b in range(B):
        ls, lt = rng.integers(1, S + 1), rng.integers(1, T)
        src[b, :ls] = rng.integers(4, V, ls)
        tgt_out[b, :lt] = rng.integers(4, V, lt)
        tgt_out[b, lt] = EOS
    tgt_in = np.concatenate([np.full((B, 1), BOS, np.int32), tgt_out[:, :-1]], axis=1)
    tgt_in[tgt_out == 0] = 0
    tgt_out[1, :3] = [5, 6, EOS]  # a few short rows the model may get right
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def _slow_sums(model, batch, beam):
    src, tgt_in, tgt_out = batch["src"], batch["tgt_in"], batch["tgt_out"]
    logits, _ = model.module(src, tgt_in, train=False)  # (B, T, V), padding included
    real = tgt_out != 0
    correct = int(np.count_nonzero((logits.argmax(-1) == tgt_out) & real))
    loss_sum, count, _ = losses.cross_entropy_fused(logits.copy(), tgt_out, ignore_index=0)
    if beam > 1:
        pred = decoding.beam_search(model.module, src, beam_size=beam, max_len=model.max_decode_len,
                                    alpha=model.length_penalty, penalty=model.length_penalty_kind)[0]
    else:
        pred = decoding.greedy(model.module, src, max_len=model.max_decode_len)
    out = {"loss_sum": loss_sum, "count": float(count), "correct": float(correct),
           "exact": float(metrics.sequence_exact_match(pred, tgt_out).sum()), "n_seq": float(len(src))}
    out.update(metrics.bleu_sums([_Words.decode(r) for r in pred], [_Words.decode(r) for r in tgt_out]))
    return out, pred


@pytest.mark.parametrize("beam", [1, 3])
def test_metric_sums_equal_the_slow_path(beam, monkeypatch):
    model = Seq2SeqModel(_module(), eval_beam_size=beam, length_penalty=1.0, max_decode_len=10,
                         length_penalty_kind="fairseq")
    model.set_tokenizer(_Words(), bleu=True)
    batch = _batch()
    want, pred = _slow_sums(model, batch, beam)
    assert 0 < want["exact"] or len({int((r != 0).sum()) for r in pred}) > 2  # decodes end at several lengths
    monkeypatch.setattr(Seq2SeqModel, "EVAL_CHUNK_TOKENS", 40)  # many chunks of a few rows
    chunks = model.eval_chunks(batch["src"], batch["tgt_out"])
    assert len(chunks) > 4 and sorted(np.concatenate(chunks)) == list(range(40))
    got = model.metric_sums(batch)
    assert set(got) == set(want)
    assert abs(got["loss_sum"] - want["loss_sum"]) <= 1e-12 * abs(want["loss_sum"])
    for k in want:
        if k != "loss_sum":
            assert got[k] == want[k], k  # counts, exact matches and BLEU n-gram statistics: identical decodes
    monkeypatch.setattr(Seq2SeqModel, "EVAL_CHUNK_TOKENS", 10_000)  # one chunk (capped by EVAL_CHUNK_ROWS)
    one = model.metric_sums(batch)
    assert abs(one["loss_sum"] - want["loss_sum"]) <= 1e-12 * abs(want["loss_sum"])
    assert one["exact"] == want["exact"] and one["bleu_sys_len"] == want["bleu_sys_len"]


def test_eval_chunks_sort_by_target_length_within_the_token_budget(monkeypatch):
    model = Seq2SeqModel(_module(), max_decode_len=10)
    batch = _batch(B=60)
    monkeypatch.setattr(Seq2SeqModel, "EVAL_CHUNK_TOKENS", 24)
    monkeypatch.setattr(Seq2SeqModel, "EVAL_CHUNK_ROWS", 5)
    tgt_len = (batch["tgt_out"] != 0).sum(1)
    chunks = model.eval_chunks(batch["src"], batch["tgt_out"])
    widths = [int(tgt_len[c].max()) for c in chunks]
    assert widths == sorted(widths)  # ascending target length
    for c in chunks:
        assert 1 <= len(c) <= 5
        assert len(c) == 1 or len(c) * tgt_len[c].max() <= 24
    assert sorted(np.concatenate(chunks)) == list(range(60))
