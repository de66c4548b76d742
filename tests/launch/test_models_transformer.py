"""Transformer TaskModel adapters: loss sums and counts, backward(scale), float64 gradient checks of the adapter's
loss, metrics (exact match through the decoding protocol), the registry."""
import numpy as np
import pytest

from ndtrain.launch.config import ConfigError

from ndtrain.data.info import BOS, EOS, PAD, TaskInfo
from ndtrain.engine import decoding
from ndtrain.engine.module import Module
from ndtrain.engine.params import ParamStore
from ndtrain.launch.models import build_model, model_names
from ndtrain.launch.models.transformer import Seq2SeqModel

TINY = {"d_model": 8, "n_heads": 2, "d_ff": 16, "dropout": 0.0}
V = 11  # ids 4..10 are "symbols"


def seq2seq_info(max_len=6):
    return TaskInfo("toy", "seq2seq", src_vocab_size=V, tgt_vocab_size=V, max_src_len=max_len,
                    max_tgt_len=max_len + 1)


def reverse_batch(rng, B, max_len=5):
    """Pad-to-longest seq2seq batch of the reverse task: tgt_in = BOS + rev, tgt_out = rev + EOS."""
    seqs = [rng.integers(4, V, rng.integers(1, max_len + 1)) for _ in range(B)]
    S = max(len(s) for s in seqs)
    src = np.zeros((B, S), np.int32)
    tgt_in = np.zeros((B, S + 1), np.int32)
    tgt_out = np.zeros((B, S + 1), np.int32)
    for i, s in enumerate(seqs):
        src[i, :len(s)] = s
        tgt_in[i, :len(s) + 1] = [BOS, *s[::-1]]
        tgt_out[i, :len(s) + 1] = [*s[::-1], EOS]
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def adapter_gradcheck(model, batch, scale=0.37, n_dirs=4, seed=0):
    """Directional derivatives of scale * loss_sum (central differences, float64) against <grad, d>."""
    store = model._store
    store.zero_grad()
    _, _, backward = model.loss(batch, train=True)
    backward(scale)
    grad = store.grad.copy()
    rng = np.random.default_rng(seed)
    ana, num = [], []
    for _ in range(n_dirs):
        d = rng.standard_normal(store.size)
        orig = store.data.copy()
        eps = 1e-6
        store.data[...] = orig + eps * d
        fp = model.loss(batch, train=True)[0]
        store.data[...] = orig - eps * d
        fm = model.loss(batch, train=True)[0]
        store.data[...] = orig
        num.append(scale * (fp - fm) / (2 * eps))
        ana.append(float(grad @ d))
    ana, num = np.array(ana), np.array(num)
    return np.linalg.norm(ana - num) / max(np.linalg.norm(ana), np.linalg.norm(num))


def built(name, info, cfg, seed=0):
    model = build_model(name, info, cfg)
    model._store = ParamStore.from_module(model.module, dtype=np.float64, seed=seed)
    return model


def test_registry_and_validation():
    assert {"transformer", "lm", "classifier"} <= set(model_names())
    with pytest.raises(ConfigError, match=r"^run\.model: 'transformer' needs a seq2seq task"):
        build_model("transformer", TaskInfo("lmtask", "lm", tgt_vocab_size=V, max_tgt_len=8), {})
    with pytest.raises(ConfigError, match=r"^model\.nope: unknown key"):
        build_model("transformer", seq2seq_info(), {"nope": 1})
    with pytest.raises(ConfigError, match=r"^run\.model: .*neither"):
        build_model("classifier", TaskInfo("c", "classification", n_outputs=2), {})


def test_model_section_of_a_trainer_config_is_read():
    from ndtrain.launch.config import Config
    cfg = Config()
    cfg.model = {**TINY, "n_enc_layers": 1, "n_dec_layers": 3, "label_smoothing": 0.1}
    m = build_model("transformer", seq2seq_info(), cfg)
    assert m.module.cfg.n_dec_layers == 3 and m.module.cfg.d_model == 8 and m.label_smoothing == 0.1
    assert m.module.cfg.src_vocab == V and m.module.cfg.max_len == 7


@pytest.mark.parametrize("extra", [{}, {"label_smoothing": 0.1, "norm_placement": "post", "tie_output": False}])
def test_seq2seq_adapter_gradcheck(extra):
    model = built("transformer", seq2seq_info(), {**TINY, "n_enc_layers": 1, "n_dec_layers": 1, **extra})
    batch = reverse_batch(np.random.default_rng(1), 3)
    assert (batch["tgt_out"] == PAD).any()
    assert adapter_gradcheck(model, batch) < 1e-6


def test_lm_and_classifier_adapter_gradcheck():
    rng = np.random.default_rng(2)
    lm = built("lm", TaskInfo("t", "lm", tgt_vocab_size=V, max_tgt_len=6), {**TINY, "n_layers": 1})
    x = rng.integers(4, V, (2, 6)).astype(np.int32)
    y = np.concatenate([x[:, 1:], rng.integers(4, V, (2, 1))], axis=1).astype(np.int32)
    y[1, 4:] = PAD
    assert adapter_gradcheck(lm, {"x": x, "y": y}) < 1e-6
    clf = built("classifier", TaskInfo("c", "classification", n_outputs=3, src_vocab_size=V, max_src_len=5),
                {**TINY, "n_layers": 1, "label_smoothing": 0.05})
    xc = rng.integers(4, V, (4, 5)).astype(np.int32)
    xc[0, 3:] = PAD
    assert adapter_gradcheck(clf, {"x": xc, "y": np.array([0, 2, 1, 2])}) < 1e-6


def test_seq2seq_loss_is_the_sum_over_real_tokens_and_backward_scales():
    model = built("transformer", seq2seq_info(), {**TINY, "n_enc_layers": 1, "n_dec_layers": 1})
    batch = reverse_batch(np.random.default_rng(3), 4)
    logits, _ = model.module(batch["src"], batch["tgt_in"], train=False)
    lp = log_softmax(logits)
    real = batch["tgt_out"] != PAD
    expect = -np.take_along_axis(lp, batch["tgt_out"][..., None].astype(np.int64), -1)[..., 0][real].sum()
    loss_sum, count, backward = model.loss(batch, train=True)
    assert count == real.sum()
    assert loss_sum == pytest.approx(expect, rel=1e-10)
    store = model._store
    store.zero_grad()
    backward(1.0)
    g1 = store.grad.copy()
    store.zero_grad()
    model.loss(batch, train=True)[2](0.25)
    np.testing.assert_allclose(store.grad, 0.25 * g1, rtol=1e-12, atol=1e-15)
    assert np.abs(g1).max() > 0
    # the PAD positions' logits take no gradient: changing the target there changes nothing
    b2 = {k: v.copy() for k, v in batch.items()}
    b2["tgt_out"][~real] = PAD
    assert model.loss(b2, train=True)[:2] == (loss_sum, count)


class OracleReverse(Module):
    """A hand-made seq2seq 'model' that reverses its source perfectly, except that it writes 4 first when the
    source starts with 10. Logits (B, T, V) depend on (src, position); it is an IncrementalDecoder."""

    def _out(self, src, t):
        s = src[src != PAD][::-1].tolist() + [EOS]
        if src[0] == 10:
            s[0] = 4
        return s[t] if t < len(s) else PAD

    def forward(self, src, tgt_in, *, train):
        B, T = tgt_in.shape
        logits = np.zeros((B, T, V))
        for b in range(B):
            for t in range(T):
                logits[b, t, self._out(src[b], t)] = 5.0
        return logits, lambda d: None

    def start(self, src, batch_size=None):
        return {"src": np.asarray(src), "pos": 0}

    def step(self, tokens, state):
        pos = state["pos"] + tokens.shape[1]
        logits = np.zeros((len(state["src"]), V))
        for b, s in enumerate(state["src"]):
            logits[b, self._out(s, pos - 1)] = 5.0
        return logits, {"src": state["src"], "pos": pos}

    def reorder(self, state, idx):
        return {"src": state["src"][idx], "pos": state["pos"]}


def test_seq2seq_metrics_count_exact_matches_through_decoding():
    batch = reverse_batch(np.random.default_rng(4), 40)
    wrong = batch["src"][:, 0] == 10
    assert 0 < wrong.sum() < 40
    model = Seq2SeqModel(OracleReverse())
    sums = model.metric_sums(batch)
    assert sums["exact"] == 40 - wrong.sum() and sums["n_seq"] == 40
    real = batch["tgt_out"] != PAD
    assert sums["count"] == real.sum() and sums["correct"] == real.sum() - wrong.sum()
    out = model.finalize(sums)
    assert out["exact_match"] == pytest.approx((40 - wrong.sum()) / 40)
    assert out["token_accuracy"] == pytest.approx(1 - wrong.sum() / real.sum())
    assert out["perplexity"] == pytest.approx(np.exp(out["loss"]))
    beam = Seq2SeqModel(OracleReverse(), eval_beam_size=3)
    assert beam.metric_sums(batch)["exact"] == sums["exact"]


def test_greedy_decode_of_a_real_model_agrees_with_teacher_forcing():
    """The tokens greedy decoding (KV cache) emits are the argmax of a full forward over its own outputs."""
    model = built("transformer", seq2seq_info(), {**TINY, "n_enc_layers": 1, "n_dec_layers": 2}, seed=5)
    batch = reverse_batch(np.random.default_rng(5), 5)
    pred = model.decode(batch["src"], max_len=7)
    tgt_in = np.concatenate([np.full((5, 1), BOS), pred[:, :-1]], axis=1).astype(np.int32)
    logits, _ = model.module(batch["src"], tgt_in, train=False)
    for b in range(5):
        n = len(pred[b]) if EOS not in pred[b] else list(pred[b]).index(EOS) + 1
        np.testing.assert_array_equal(logits[b, :n].argmax(-1), pred[b, :n])


def test_lm_metrics_and_generate():
    lm = built("lm", TaskInfo("t", "lm", tgt_vocab_size=V, max_tgt_len=4), {**TINY, "n_layers": 1}, seed=1)
    rng = np.random.default_rng(6)
    x = rng.integers(4, V, (3, 4)).astype(np.int32)
    y = rng.integers(4, V, (3, 4)).astype(np.int32)
    y[0, 2:] = PAD
    sums = lm.metric_sums({"x": x, "y": y})
    assert sums["count"] == 10
    out = lm.finalize(sums)
    assert out["perplexity"] == pytest.approx(np.exp(out["loss"]))
    assert 0 <= out["token_accuracy"] <= 1
    # generation slides over the block: more new tokens than the context holds, reproducible by seed
    a = lm.generate(np.full((2, 1), 4), 10, rng=3)
    b = lm.generate(np.full((2, 1), 4), 10, rng=3)
    assert a.shape == (2, 10) and np.array_equal(a, b)
    g = lm.generate(np.full((2, 1), 4), 10, temperature=0)
    ctx = [4]
    for t in range(10):  # greedy by full recompute over the last 4 tokens
        logits, _ = lm.module(np.array([ctx[-4:]], np.int32), train=False)
        ctx.append(int(logits[0, -1].argmax()))
    np.testing.assert_array_equal(g[0], ctx[1:])


def test_a_tiny_seq2seq_learns_to_reverse():
    from ndtrain.engine.optim import AdamW
    info = seq2seq_info(max_len=3)
    model = build_model("transformer", info, {"d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
                                             "n_enc_layers": 1, "n_dec_layers": 1})
    store = ParamStore.from_module(model.module, seed=0)
    opt = AdamW(store, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    first = None
    for step in range(150):
        batch = reverse_batch(rng, 32, max_len=3)
        store.zero_grad()
        loss_sum, count, backward = model.loss(batch, train=True)
        backward(1.0 / count)
        opt.step()
        first = first if first is not None else loss_sum / count
    val = model.finalize(model.metric_sums(reverse_batch(np.random.default_rng(99), 200, max_len=3)))
    assert val["loss"] < 0.25 * first
    assert val["exact_match"] > 0.5


def test_classifier_on_float_features_uses_the_feature_token_classifier_and_learns_xor():
    """The engine module itself is gradient-checked in tests/engine/test_transformer_models.py."""
    from ndtrain.engine.optim import AdamW
    from ndtrain.engine.transformer import FeatureTokenClassifier
    info = TaskInfo("xor", "classification", n_features=3, n_outputs=2)
    clf = built("classifier", info, {**TINY, "n_layers": 1})
    assert isinstance(clf.module, FeatureTokenClassifier)
    x = np.random.default_rng(7).standard_normal((4, 3))
    assert adapter_gradcheck(clf, {"x": x, "y": np.array([0, 1, 1, 0])}) < 1e-6
    # xor of the first two features (the third is noise) is learned
    rng = np.random.default_rng(0)
    model = build_model("classifier", info, {"d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0,
                                             "n_layers": 1})
    store = ParamStore.from_module(model.module, seed=0)
    opt = AdamW(store, lr=1e-2, weight_decay=0.0)

    def data(n):
        bits = rng.integers(0, 2, (n, 2))
        xx = np.concatenate([bits + 0.1 * rng.standard_normal((n, 2)), rng.standard_normal((n, 1))], 1)
        return {"x": xx.astype(np.float32), "y": (bits[:, 0] ^ bits[:, 1]).astype(np.int64)}
    for _ in range(150):
        store.zero_grad()
        ls, c, bw = model.loss(data(64), train=True)
        bw(1.0 / c)
        opt.step()
    assert model.finalize(model.metric_sums(data(400)))["accuracy"] > 0.95


def test_beam_search_on_a_real_model_uses_the_kv_cache_consistently():
    model = built("transformer", seq2seq_info(), {**TINY, "n_enc_layers": 1, "n_dec_layers": 2}, seed=8)
    src = reverse_batch(np.random.default_rng(8), 4)["src"]
    g = model.decode(src, max_len=7)
    np.testing.assert_array_equal(model.decode(src, max_len=7, beam_size=1), g)
    tok, score = decoding.beam_search(model.module, src, beam_size=3, max_len=7, alpha=0.0)
    assert tok.shape[0] == 4 and np.isfinite(score).all()
    # the reported score is the log-probability of the returned tokens under a full (teacher-forced) forward
    for b in range(4):
        seq = [t for t in tok[b].tolist()]
        n = seq.index(EOS) + 1 if EOS in seq else len(seq)
        tgt_in = np.array([[BOS, *seq[:n - 1]]], np.int32)
        lp = log_softmax(model.module(src[b:b + 1], tgt_in, train=False)[0])[0]
        assert score[b] == pytest.approx(sum(lp[t, seq[t]] for t in range(n)), rel=1e-8)


def test_lm_context_shorter_than_the_data_blocks_is_refused_naming_the_field():
    info = TaskInfo("t", "lm", tgt_vocab_size=V, max_tgt_len=64)
    with pytest.raises(ConfigError, match=r"model\.block_size: 16 is shorter than the data's blocks of 64"):
        built("lm", info, {**TINY, "n_layers": 1, "block_size": 16})
    assert built("lm", info, {**TINY, "n_layers": 1, "block_size": 128}).block_size == 128  # longer is fine
