"""The "seq2seq-rnn" and "cnn" TaskModels: registry, config validation, the loss/backward contract (checked by
finite differences through the adapter), metrics, and the small CNN's accuracy on sklearn's digits."""
import numpy as np
import pytest

from ndtrain.data.info import BOS, EOS, PAD, TaskInfo
from ndtrain.engine import ParamStore
from ndtrain.engine.optim import Adam
from ndtrain.launch.config import ConfigError
from ndtrain.launch.models import build_model, model_names

SEQ_INFO = TaskInfo("reverse", "seq2seq", src_vocab_size=14, tgt_vocab_size=14, max_src_len=6, max_tgt_len=7)
DIGITS_INFO = TaskInfo("digits", "classification", n_features=64, n_outputs=10)


def _seq_batch():
    src = np.array([[5, 6, 7, EOS], [4, 8, EOS, PAD]], np.int32)
    tgt_in = np.array([[BOS, 7, 6, 5], [BOS, 8, 4, PAD]], np.int32)
    tgt_out = np.array([[7, 6, 5, EOS], [8, 4, EOS, PAD]], np.int32)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def test_registered():
    assert {"seq2seq-rnn", "cnn"} <= set(model_names())


@pytest.mark.parametrize("table", [{"cell": "lstm", "attention": "luong"}, {"attention": "bahdanau", "num_layers": 2}])
def test_seq2seq_rnn_loss_gradient_and_metrics(table):
    model = build_model("seq2seq-rnn", SEQ_INFO, {**table, "hidden_size": 8, "d_embed": 6})
    store = ParamStore.from_module(model.module, dtype=np.float64, seed=0)
    batch = _seq_batch()
    loss_sum, count, backward = model.loss(batch, train=True)
    assert count == 7 and np.isfinite(loss_sum)
    store.zero_grad()
    backward(0.5)
    g = store.grad.copy()
    d = np.random.default_rng(0).standard_normal(store.size)
    eps = 1e-6
    store.data += eps * d
    lp = model.loss(batch, train=False)[0]
    store.data -= 2 * eps * d
    lm = model.loss(batch, train=False)[0]
    store.data += eps * d
    np.testing.assert_allclose(0.5 * (lp - lm) / (2 * eps), g @ d, rtol=1e-6)
    out = model.finalize(model.metric_sums(batch))
    assert 0.0 <= out["token_accuracy"] <= 1.0 and out["exact_match"] in (0.0, 0.5, 1.0)
    assert out["loss"] == pytest.approx(loss_sum / count)


def test_seq2seq_rnn_config_errors():
    with pytest.raises(ConfigError, match="model.attention"):
        build_model("seq2seq-rnn", SEQ_INFO, {"attention": "general"})
    with pytest.raises(ConfigError, match="model.colour"):
        build_model("seq2seq-rnn", SEQ_INFO, {"colour": 1})
    with pytest.raises(ConfigError, match="seq2seq task"):
        build_model("seq2seq-rnn", DIGITS_INFO, {})


def test_cnn_shapes_and_config_errors():
    model = build_model("cnn", DIGITS_INFO, {"channels": [4, 8], "hidden": 0, "head": "gap"})
    ParamStore.from_module(model.module)
    assert model.predict(np.zeros((3, 64), np.float32)).shape == (3,)
    with pytest.raises(ConfigError, match="square"):
        build_model("cnn", TaskInfo("x", "classification", n_features=10, n_outputs=2), {})
    with pytest.raises(ConfigError, match="model.head"):
        build_model("cnn", DIGITS_INFO, {"head": "max"})


def test_cnn_loss_gradient_through_adapter():
    model = build_model("cnn", DIGITS_INFO, {"channels": [3], "hidden": 5})
    store = ParamStore.from_module(model.module, dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    batch = {"x": rng.random((4, 64)), "y": np.array([0, 3, 9, 3])}
    _, count, backward = model.loss(batch, train=True)
    store.zero_grad()
    backward(1.0 / count)
    d = rng.standard_normal(store.size)
    eps = 1e-6
    store.data += eps * d
    lp = model.loss(batch, train=False)[0]
    store.data -= 2 * eps * d
    lm = model.loss(batch, train=False)[0]
    store.data += eps * d
    np.testing.assert_allclose((lp - lm) / (2 * eps) / count, store.grad @ d, rtol=1e-6)


def _digits_split():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.8 * len(y))
    return x, y, order[:n_train], order[n_train:]


def _train_cnn(epochs, cfg, lr=2e-3, batch_size=32):
    x, y, train, test = _digits_split()
    model = build_model("cnn", DIGITS_INFO, cfg)
    store = ParamStore.from_module(model.module, seed=0)
    opt = Adam(store, lr=lr)
    rng = np.random.default_rng(1)
    steps, total = 0, epochs * -(-len(train) // batch_size)
    for _ in range(epochs):
        perm = rng.permutation(train)
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            store.zero_grad()
            _, count, backward = model.loss({"x": x[b], "y": y[b]}, train=True)
            backward(1.0 / count)
            opt.step(lr=lr * (1.0 - steps / total))  # linear decay to 0
            steps += 1
    return model.finalize(model.metric_sums({"x": x[test], "y": y[test]}))["accuracy"]


def test_cnn_learns_digits_quickly():
    assert _train_cnn(2, {"channels": [8, 16], "hidden": 32}, lr=4e-3) > 0.6  # chance is 0.1


@pytest.mark.slow
def test_cnn_reaches_98_percent_on_digits():
    acc = _train_cnn(15, {})
    print(f"digits test accuracy: {acc:.4f}")
    assert acc >= 0.98
