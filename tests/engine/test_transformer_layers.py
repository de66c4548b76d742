"""Transformer layers: FFN, norms, embeddings, positions, encoder/decoder blocks (pre- and post-LN)."""
import numpy as np
import pytest

from ndtrain.engine import ParamStore, layers
from ndtrain.engine.attention import make_attention_mask
from ndtrain.engine.gradcheck import assert_gradcheck, check_function
from ndtrain.engine.module import seed_rngs
from ndtrain.engine.transformer import (DecoderBlock, EncoderBlock, LayerNorm, LearnedPositionalEmbedding,
                                        PositionWiseFFN, RMSNorm, SinusoidalPositionalEncoding, TokenEmbedding)
from helpers.perturb import perturb

RNG = np.random.default_rng(0)


def test_transformer_norms_are_the_engine_layers():
    """One LayerNorm / RMSNorm in the engine: the Transformer re-exports engine.layers' classes."""
    assert LayerNorm is layers.LayerNorm and RMSNorm is layers.RMSNorm


def test_ffn_gelu_equals_the_gelu_layer_between_its_projections():
    """The FFN's GELU is the GELU layer's kernel: FFN(x) = GELU(x W1 + b1) W2 + b2 to rounding, forward and dx."""
    m = PositionWiseFFN(6, 10, "gelu")
    ParamStore.from_module(m, dtype=np.float64, seed=3)
    x = RNG.standard_normal((2, 3, 6)) * 2
    y, back = m(x, train=True)
    h = x @ m.w1.data + m.b1.data
    a, gelu_back = layers.GELU()(h, train=True)
    np.testing.assert_allclose(y, a @ m.w2.data + m.b2.data, rtol=1e-13, atol=1e-13)
    dy = RNG.standard_normal(y.shape)
    np.testing.assert_allclose(back(dy), gelu_back(dy @ m.w2.data.T) @ m.w1.data.T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_norm_gradcheck(cls):
    m = cls(6)
    ParamStore.from_module(m, dtype=np.float64)
    perturb(m)
    assert_gradcheck(m, [RNG.standard_normal((2, 3, 6))])


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_ffn_gradcheck(activation):
    m = PositionWiseFFN(6, 10, activation)
    ParamStore.from_module(m, dtype=np.float64, seed=1)
    x = RNG.standard_normal((2, 3, 6))
    assert_gradcheck(m, [x])
    y, _ = m(x, train=False)
    assert y.shape == x.shape


def test_ffn_is_position_wise():
    m = PositionWiseFFN(4, 8, "gelu")
    ParamStore.from_module(m, dtype=np.float64)
    x = RNG.standard_normal((2, 5, 4))
    y, _ = m(x, train=False)
    np.testing.assert_allclose(m(x[:, 2:3], train=False)[0], y[:, 2:3], rtol=1e-12)


def test_token_embedding_scale_and_grad_with_repeated_ids():
    emb = TokenEmbedding(7, 4, scale=True)
    ParamStore.from_module(emb, dtype=np.float64)
    ids = np.array([[1, 3, 1], [6, 1, 0]])
    y, backward = emb(ids, train=True)
    np.testing.assert_allclose(y, emb.weight.data[ids] * 2.0)
    dy = RNG.standard_normal(y.shape)
    backward(dy)
    expect = np.zeros((7, 4))
    np.add.at(expect, ids.reshape(-1), 2.0 * dy.reshape(-1, 4))
    np.testing.assert_allclose(emb.weight.grad, expect, rtol=1e-12)
    with pytest.raises(IndexError, match="out of range"):
        emb(np.array([[7]]), train=False)


def test_tied_logits_gradcheck():
    emb = TokenEmbedding(5, 4)
    ParamStore.from_module(emb, dtype=np.float64)
    h = RNG.standard_normal((2, 3, 4))
    c = RNG.standard_normal((2, 3, 5))
    _, backward = emb.logits(h)
    emb.weight.grad[...] = 0
    dh = backward(c)
    W0 = emb.weight.data.copy()
    errs = check_function(lambda h, W: float(np.sum((h @ W.T) * c)), [h, W0], [dh, emb.weight.grad.copy()])
    assert max(errs.values()) < 1e-7


def test_positional_encodings():
    sin = SinusoidalPositionalEncoding(50, 8)
    p, _ = sin(10, offset=3, train=False)
    assert p.shape == (10, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p[0, 0], np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(p[2, 1], np.cos(5.0), rtol=1e-6)
    learned = LearnedPositionalEmbedding(6, 3)
    ParamStore.from_module(learned, dtype=np.float64)
    p, backward = learned(2, offset=4, train=True)
    np.testing.assert_array_equal(p, learned.weight.data[4:6])
    backward(np.ones((2, 3)))
    assert learned.weight.grad.sum() == 6 and learned.weight.grad[4:].sum() == 6
    with pytest.raises(ValueError, match="max_len 6"):
        learned(3, offset=4, train=False)


BLOCK_CASES = [(pre, norm, act) for pre in (True, False) for norm, act in (("layer", "gelu"), ("rms", "swiglu"))]


@pytest.mark.parametrize("pre_norm,norm,activation", BLOCK_CASES)
def test_encoder_block_gradcheck(pre_norm, norm, activation):
    blk = EncoderBlock(8, 2, 12, dropout=0.2, activation=activation, norm=norm, pre_norm=pre_norm)
    ParamStore.from_module(blk, dtype=np.float64, seed=2)
    perturb(blk)
    x = RNG.standard_normal((2, 4, 8))
    mask = make_attention_mask(np.array([[False] * 4, [False, False, True, True]]), dtype=np.float64)
    assert_gradcheck(blk, [x], forward_kwargs={"mask": mask}, before_forward=lambda: seed_rngs(blk, 3))


@pytest.mark.parametrize("pre_norm,norm,activation", BLOCK_CASES)
def test_decoder_block_gradcheck(pre_norm, norm, activation):
    blk = DecoderBlock(8, 2, 12, dropout=0.2, activation=activation, norm=norm, pre_norm=pre_norm)
    ParamStore.from_module(blk, dtype=np.float64, seed=3)
    perturb(blk)
    x, mem = RNG.standard_normal((2, 3, 8)), RNG.standard_normal((2, 4, 8))
    kw = {"self_mask": make_attention_mask(causal=True, tq=3, tk=3, dtype=np.float64),
          "cross_mask": make_attention_mask(np.array([[False] * 4, [False, True, True, True]]), dtype=np.float64)}
    errors = assert_gradcheck(blk, [x, mem], forward_kwargs=kw, before_forward=lambda: seed_rngs(blk, 4))
    assert "input1" in errors  # the memory gradient is checked too


def test_dropout_only_in_training_and_reproducible_by_seed():
    blk = EncoderBlock(8, 2, 12, dropout=0.5)
    ParamStore.from_module(blk, dtype=np.float64)
    x = RNG.standard_normal((2, 4, 8))
    a, _ = blk(x, train=False)
    np.testing.assert_array_equal(blk(x, train=False)[0], a)
    seed_rngs(blk, 1)
    b, _ = blk(x, train=True)
    seed_rngs(blk, 1)
    np.testing.assert_array_equal(blk(x, train=True)[0], b)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("block_elems", [20, 1 << 30])  # d_ff 10: 2 rows per block (a short last one), one block
def test_ffn_gelu_training_path_by_row_blocks(monkeypatch, block_elems):
    """The training GELU FFN runs GEMM -> GELU -> GEMM by blocks of rows (forward and backward): same outputs as the
    inference path, and gradients pass the float64 check whatever the block size."""
    from ndtrain.engine.transformer import ffn
    monkeypatch.setattr(ffn, "FFN_BLOCK_ELEMS", block_elems)
    m = PositionWiseFFN(6, 10, "gelu")
    ParamStore.from_module(m, dtype=np.float64, seed=2)
    perturb(m)
    x = RNG.standard_normal((3, 5, 6))  # 15 rows
    np.testing.assert_allclose(m(x, train=True)[0], m(x, train=False)[0], rtol=1e-13, atol=1e-14)
    assert_gradcheck(m, [x])
