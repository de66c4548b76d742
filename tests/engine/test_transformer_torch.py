"""Optional: a pre-LN encoder block and decoder block equal PyTorch's (nn.TransformerEncoderLayer /
nn.TransformerDecoderLayer, norm_first=True, GELU-tanh) forward and backward in float64, same weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from ndtrain.engine import ParamStore  # noqa: E402
from ndtrain.engine.attention import make_attention_mask  # noqa: E402
from ndtrain.engine.transformer import DecoderBlock, EncoderBlock  # noqa: E402

D, H, F = 8, 2, 12


def _gelu(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def _load_common(ours, theirs, attn_pairs):
    """Copy torch's weights into our block (Linear weights are (out, in) in torch, (in, out) here)."""
    t = {k: v.detach().numpy() for k, v in theirs.named_parameters()}
    ours.ffn.w1.data[...] = t["linear1.weight"].T
    ours.ffn.b1.data[...] = t["linear1.bias"]
    ours.ffn.w2.data[...] = t["linear2.weight"].T
    ours.ffn.b2.data[...] = t["linear2.bias"]
    for mine, prefix in attn_pairs:
        W, b = t[f"{prefix}.in_proj_weight"], t[f"{prefix}.in_proj_bias"]
        if mine.cross:
            mine.w_q.data[...], mine.b_q.data[...] = W[:D].T, b[:D]
            mine.w_kv.data[...], mine.b_kv.data[...] = W[D:].T, b[D:]
        else:
            mine.w_qkv.data[...], mine.b_qkv.data[...] = W.T, b
        mine.w_o.data[...], mine.b_o.data[...] = t[f"{prefix}.out_proj.weight"].T, t[f"{prefix}.out_proj.bias"]
    return t


def _grad_map(ours_block, theirs):
    """(our grad, torch grad) pairs for the FFN and norms."""
    g = {k: v.grad.numpy() for k, v in theirs.named_parameters()}
    pairs = [(ours_block.ffn.w1.grad, g["linear1.weight"].T), (ours_block.ffn.b2.grad, g["linear2.bias"])]
    for i in (1, 2):
        pairs.append((getattr(ours_block, f"norm{i}").gamma.grad, g[f"norm{i}.weight"]))
        pairs.append((getattr(ours_block, f"norm{i}").beta.grad, g[f"norm{i}.bias"]))
    return pairs, g


def _perturb_torch(m):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_pre_ln_encoder_block_equals_torch():
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation=_gelu, batch_first=True,
                                              norm_first=True).double()
    _perturb_torch(theirs)
    ours = EncoderBlock(D, H, F, dropout=0.0, activation="gelu", pre_norm=True)
    ParamStore.from_module(ours, dtype=np.float64)
    t = _load_common(ours, theirs, [(ours.self_attn, "self_attn")])
    for i in (1, 2):
        getattr(ours, f"norm{i}").gamma.data[...] = t[f"norm{i}.weight"]
        getattr(ours, f"norm{i}").beta.data[...] = t[f"norm{i}.bias"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, D))
    pad = np.array([[False] * 5, [False, False, False, True, True]])
    c = rng.standard_normal((2, 5, D))

    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt, src_key_padding_mask=torch.tensor(pad))
    (yt * torch.tensor(c)).sum().backward()
    y, backward = ours(x, mask=make_attention_mask(pad, dtype=np.float64), train=True)
    dx = backward(c)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    pairs, g = _grad_map(ours, theirs)
    pairs.append((ours.self_attn.w_qkv.grad, g["self_attn.in_proj_weight"].T))
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_pre_ln_decoder_block_equals_torch():
    torch.manual_seed(1)
    theirs = torch.nn.TransformerDecoderLayer(D, H, F, dropout=0.0, activation=_gelu, batch_first=True,
                                              norm_first=True).double()
    _perturb_torch(theirs)
    ours = DecoderBlock(D, H, F, dropout=0.0, activation="gelu", pre_norm=True)
    ParamStore.from_module(ours, dtype=np.float64)
    t = _load_common(ours, theirs, [(ours.self_attn, "self_attn"), (ours.cross_attn, "multihead_attn")])
    for i in (1, 2, 3):
        getattr(ours, f"norm{i}").gamma.data[...] = t[f"norm{i}.weight"]
        getattr(ours, f"norm{i}").beta.data[...] = t[f"norm{i}.bias"]
    rng = np.random.default_rng(2)
    x, mem, c = rng.standard_normal((2, 4, D)), rng.standard_normal((2, 6, D)), rng.standard_normal((2, 4, D))
    mem_pad = np.array([[False] * 6, [False, False, True, True, True, True]])

    xt, mt = torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    yt = theirs(xt, mt, tgt_mask=causal, memory_key_padding_mask=torch.tensor(mem_pad))
    (yt * torch.tensor(c)).sum().backward()
    y, backward = ours(x, mem, self_mask=make_attention_mask(causal=True, tq=4, tk=4, dtype=np.float64),
                       cross_mask=make_attention_mask(mem_pad, dtype=np.float64), train=True)
    dx, dmem = backward(c)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dmem, mt.grad.numpy(), rtol=1e-9, atol=1e-12)
    g = {k: v.grad.numpy() for k, v in theirs.named_parameters()}
    np.testing.assert_allclose(ours.cross_attn.w_kv.grad, g["multihead_attn.in_proj_weight"][D:].T, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(ours.norm3.gamma.grad, g["norm3.weight"], rtol=1e-9, atol=1e-12)
