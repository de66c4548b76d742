"""The MLP TaskModel: gradient of loss_sum through backward(scale), metrics as exact sums, builder options."""
import numpy as np
import pytest

from ndtrain.data.info import TaskInfo
from ndtrain.engine.gradcheck import check_function
from ndtrain.engine.params import ParamStore
from ndtrain.launch.config import ConfigError
from ndtrain.launch.models import build_model

CLS3 = TaskInfo("t3", "classification", n_features=5, n_outputs=3)
BIN = TaskInfo("xor", "classification", n_features=2, n_outputs=2)
REG = TaskInfo("r", "regression", n_features=3, n_outputs=2)


def _batch(info, B=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, info.n_features))
    if info.kind == "regression":
        y = rng.standard_normal((B, info.n_outputs))
    else:
        y = rng.integers(0, info.n_outputs, B)
    return {"x": x, "y": y}


@pytest.mark.parametrize("info, act", [(CLS3, "tanh"), (BIN, "tanh"), (REG, "tanh"), (CLS3, "relu")])
def test_loss_backward_matches_numeric_gradient(info, act):
    tm = build_model("mlp", info, {"hidden": [4, 3], "activation": act})
    store = ParamStore.from_module(tm.module, dtype=np.float64, seed=3)
    if act == "relu":  # keep pre-activations away from the kink
        store.data[:] = np.where(np.abs(store.data) < 0.05, 0.3, store.data)
    batch = _batch(info)
    scale = 0.37

    def f(flat):
        store.data[:] = flat
        return scale * tm.loss(batch, train=True)[0]

    flat0 = store.data.copy()
    store.zero_grad()
    loss_sum, count, backward = tm.loss(batch, train=True)
    backward(scale)
    grad = store.grad.copy()
    err = check_function(f, [flat0], [grad], full_max=10_000)
    assert err["input0"] < 1e-6, err
    assert count == (6 * info.n_outputs if info.kind == "regression" else 6)


def test_shapes_and_single_logit():
    assert build_model("mlp", BIN, {"hidden": [4]}).module[-1].d_out == 1  # the classic 2-4-1 net
    assert build_model("mlp", BIN, {"hidden": [4], "binary_single_logit": False}).module[-1].d_out == 2
    assert build_model("mlp", CLS3, {}).module[-1].d_out == 3
    sizes = [m.d_out for m in build_model("mlp", CLS3, {"hidden": [7, 5]}).module.layers if hasattr(m, "d_out")]
    assert sizes == [7, 5, 3]


@pytest.mark.parametrize("info", [CLS3, BIN, REG])
def test_metric_sums_add_up_over_splits(info):
    tm = build_model("mlp", info, {"hidden": [8]})
    ParamStore.from_module(tm.module, dtype=np.float64, seed=1)
    batch = _batch(info, B=10, seed=5)
    whole = tm.metric_sums(batch)
    a = tm.metric_sums({k: v[:4] for k, v in batch.items()})
    b = tm.metric_sums({k: v[4:] for k, v in batch.items()})
    for k in whole:
        assert whole[k] == pytest.approx(a[k] + b[k], rel=1e-12)
    m = tm.finalize(whole)
    loss_sum, count, _ = tm.loss(batch, train=False)
    assert m["loss"] == pytest.approx(loss_sum / count, rel=1e-12)
    if info.kind == "regression":
        pred = tm.predict(batch["x"])
        assert m["mse"] == pytest.approx(np.mean((pred - batch["y"]) ** 2), rel=1e-12)
    else:
        assert m["accuracy"] == pytest.approx(np.mean(tm.predict(batch["x"]) == batch["y"]))


@pytest.mark.parametrize("cfg, field", [({"hiddn": [3]}, "model.hiddn"), ({"activation": "swoosh"}, "model.activation"),
                                        ({"hidden": [0]}, "model.hidden"), ({"dropout": 1.5}, "model.dropout")])
def test_bad_options_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_model("mlp", CLS3, cfg)
    assert str(e.value).startswith(field)


def test_rejects_sequence_tasks():
    with pytest.raises(ConfigError, match="vector task"):
        build_model("mlp", TaskInfo("copy", "seq2seq", src_vocab_size=10, tgt_vocab_size=10), {})


AND = {"x": np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float), "y": np.array([0, 0, 0, 1])}
XOR = {"x": AND["x"], "y": np.array([0, 1, 1, 0])}


def _sgd_epochs(tm, store, batch, epochs, lr=1.0):
    """Plain SGD on the loop's contract: backward(1 / count), p -= lr g (the trainer with optim.name = sgd)."""
    for _ in range(epochs):
        for i in range(len(batch["y"])):  # batch size 1: Rosenblatt's rule exactly
            store.zero_grad()
            _, count, backward = tm.loss({k: v[i:i + 1] for k, v in batch.items()}, train=True)
            backward(1.0 / count)
            store.data -= lr * store.grad


def test_perceptron_learns_and_not_xor():
    for batch, solvable in ((AND, True), (XOR, False)):
        tm = build_model("perceptron", BIN, {})
        store = ParamStore.from_module(tm.module, dtype=np.float64)
        _sgd_epochs(tm, store, batch, 20)
        acc = tm.finalize(tm.metric_sums(batch))["accuracy"]
        assert (acc == 1.0) == solvable, (batch["y"], acc)
        assert acc <= 0.75 or solvable  # no line separates XOR: at most 3 of 4 right


def test_perceptron_step_is_the_perceptron_rule():
    tm = build_model("perceptron", BIN, {})
    store = ParamStore.from_module(tm.module, dtype=np.float64)
    store.data[:] = [0.5, -1.0, 0.25]  # w (2, 1), b (1,)
    x, y = XOR["x"], XOR["y"]
    yhat = (x @ store.data[:2] + store.data[2] > 0).astype(float)
    store.zero_grad()
    loss_sum, count, backward = tm.loss(XOR, train=True)
    backward(1.0 / count)
    np.testing.assert_allclose(-store.grad[:2], (y - yhat) @ x / 4, atol=1e-15)
    np.testing.assert_allclose(-store.grad[2], np.sum(y - yhat) / 4, atol=1e-15)
    z = x @ store.data[:2] + store.data[2]
    assert loss_sum == pytest.approx(np.sum((yhat - y) * z)) and loss_sum >= 0


def test_perceptron_rejects_multiclass_and_options():
    with pytest.raises(ConfigError, match="two-class"):
        build_model("perceptron", CLS3, {})
    with pytest.raises(ConfigError, match="^model.hidden"):
        build_model("perceptron", BIN, {"hidden": [3]})
