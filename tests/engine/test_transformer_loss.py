"""The Transformers' training loss path (model.loss): the output projection and softmax on the real target rows
only (gathered before the output GEMM) equal the full path - logits of every position, then cross_entropy - in loss
and in every parameter gradient (tied embeddings included: both uses of the shared matrix); float64 gradient checks
of model.loss itself."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, losses
from ndtrain.engine.gradcheck import assert_gradcheck
from ndtrain.engine.module import Module, seed_rngs
from ndtrain.engine.transformer import DecoderLM, DecoderLMConfig, Seq2SeqConfig, Seq2SeqTransformer

SMALL = dict(d_model=8, n_heads=2, d_ff=12, max_len=16)
S2S = {"tied": dict(tie_output=True, share_embeddings=True),
       "untied": dict(tie_output=False, share_embeddings=False, norm_placement="post")}
LM = {"tied": dict(tie_embeddings=True), "untied": dict(tie_embeddings=False)}


def _ids(rng, shape, vocab, pad_tail):
    ids = rng.integers(4, vocab, shape)
    for row, n in pad_tail.items():
        ids[row, ids.shape[1] - n:] = 0
    return ids


def seq2seq(kind, dtype=np.float64, dropout=0.0):
    m = Seq2SeqTransformer(Seq2SeqConfig(**SMALL, src_vocab=13, tgt_vocab=13, n_enc_layers=1, n_dec_layers=1,
                                         dropout=dropout, **S2S[kind]))
    ParamStore.from_module(m, dtype=dtype, seed=1)
    rng = np.random.default_rng(0)
    for _, p in m.named_params():
        p.data += (0.2 * rng.standard_normal(p.shape)).astype(dtype)
    src = _ids(rng, (3, 6), 13, {1: 2, 2: 4})
    tgt = _ids(rng, (3, 6), 13, {0: 3, 2: 1})  # tgt_in and tgt_out share their PAD positions, as the data's
    return m, src, tgt, np.roll(tgt, -1, axis=1) * (tgt != 0)


def lm(kind, dtype=np.float64):
    m = DecoderLM(DecoderLMConfig(**SMALL, vocab_size=11, n_layers=1, dropout=0.0, **LM[kind]))
    ParamStore.from_module(m, dtype=dtype, seed=2)
    rng = np.random.default_rng(1)
    x = _ids(rng, (3, 7), 11, {0: 2, 1: 5})
    return m, x, np.roll(x, -1, axis=1) * (x != 0)


def grads(m):
    return {n: p.grad.copy() for n, p in m.named_params()}


def zero(m):
    for _, p in m.named_params():
        p.grad[...] = 0


def full_path(m, inputs, y, eps, scale):
    """The reference: logits of every position, plain cross-entropy, the module's own backward."""
    zero(m)
    logits, backward = m(*inputs, train=True)
    loss, count, grad_fn = losses.cross_entropy_fused(logits, y, ignore_index=0, label_smoothing=eps)
    backward(grad_fn(scale))
    return loss, count, grads(m)


def loss_path(m, inputs, y, eps, scale, gather=True):
    zero(m)
    loss, count, backward = m.loss(*inputs, y, ignore_index=0, label_smoothing=eps, gather=gather, train=True)
    backward(scale)
    return loss, count, grads(m)


def assert_same(a, b, rtol=1e-10):
    assert a[0] == pytest.approx(b[0], rel=rtol) and a[1] == b[1]
    assert sorted(a[2]) == sorted(b[2])
    for name in a[2]:
        np.testing.assert_allclose(a[2][name], b[2][name], rtol=rtol, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", sorted(S2S))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_seq2seq_gathered_loss_equals_full_path(kind, eps):
    m, src, tgt_in, tgt_out = seq2seq(kind)
    ref = full_path(m, (src, tgt_in), tgt_out, eps, 0.3)
    assert ref[1] < tgt_out.size  # there is padding to skip
    assert_same(loss_path(m, (src, tgt_in), tgt_out, eps, 0.3), ref)
    assert_same(loss_path(m, (src, tgt_in), tgt_out, eps, 0.3, gather=False), ref)
    if kind == "tied":  # one matrix for both embeddings and the output layer: its gradient sums all three uses
        assert m.src_embed.tokens is m.tgt_embed.tokens


@pytest.mark.parametrize("kind", sorted(LM))
def test_lm_gathered_loss_equals_full_path(kind):
    m, x, y = lm(kind)
    ref = full_path(m, (x,), y, 0.1, 1.0)
    assert_same(loss_path(m, (x,), y, 0.1, 1.0), ref)
    y_full = np.random.default_rng(3).integers(4, 11, x.shape)  # no padding: nothing gathered, same path
    assert_same(loss_path(m, (x,), y_full, 0.0, 1.0), full_path(m, (x,), y_full, 0.0, 1.0))


def test_seq2seq_gathered_loss_float32_close_to_full_path():
    m, src, tgt_in, tgt_out = seq2seq("untied", dtype=np.float32, dropout=0.1)
    seed_rngs(m, 5)
    ref = full_path(m, (src, tgt_in), tgt_out, 0.1, 0.5)
    seed_rngs(m, 5)  # the same dropout masks
    got = loss_path(m, (src, tgt_in), tgt_out, 0.1, 0.5)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    for name in ref[2]:
        np.testing.assert_allclose(got[2][name], ref[2][name], rtol=2e-3, atol=2e-5, err_msg=name)


class LossOf(Module):
    """model.loss as a module with a scalar output, for assert_gradcheck: forward(*inputs) -> loss_sum."""

    def __init__(self, model, eps):
        super().__init__()
        self.model, self.eps = model, eps

    def forward(self, *inputs, train: bool):
        loss, _, backward = self.model.loss(*inputs, ignore_index=0, label_smoothing=self.eps, train=train)

        def grad(c):
            backward(float(c))
            return None

        return np.asarray(loss), grad


@pytest.mark.parametrize("kind", sorted(S2S))
def test_seq2seq_loss_gradcheck(kind):
    m, src, tgt_in, tgt_out = seq2seq(kind, dropout=0.1)
    assert_gradcheck(LossOf(m, 0.1), [src, tgt_in, tgt_out], before_forward=lambda: seed_rngs(m, 7), n_dirs=3)


@pytest.mark.parametrize("kind", sorted(LM))
def test_lm_loss_gradcheck(kind):
    m, x, y = lm(kind)
    assert_gradcheck(LossOf(m, 0.1), [x, y], n_dirs=3)
