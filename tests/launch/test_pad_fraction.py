"""pad_fraction: the share of the positions a training step computes on (source + decoder input, or the LM input)
that are PAD, summed over the log window and over all ranks, in every train record of metrics.jsonl."""
import numpy as np
import pytest

from ndtrain.launch.task_data import load_task_data, make_loader
from ndtrain.data.info import PAD, TaskInfo
from ndtrain.launch.cli import main
from ndtrain.launch.config import Config, apply_overrides
from ndtrain.launch.models.transformer import build_transformer
from ndtrain.launch.rundir import read_metrics, train_events

TINY = ["--task", "reverse", "--model", "transformer", "--batch-size", "16", "--steps", "6", "--seed", "2",
        "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_ff=32",
        "--set", "model.n_enc_layers=1", "--set", "model.n_dec_layers=1", "--set", "data.rows=400",
        "--set", "run.log_every=2", "--set", "run.eval_every=0", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _no_report_no_tensorboard(monkeypatch):
    monkeypatch.setenv("NDTRAIN_REPORT", "0")
    monkeypatch.setenv("NDTRAIN_TENSORBOARD", "0")


class TwoRanks:
    """A communicator stand-in: the other rank contributes `other` to every all-reduce."""
    world_size = 2

    def __init__(self, other):
        self.other = np.asarray(other, dtype=np.float64)

    def allreduce(self, buf):
        buf += self.other


def test_adapter_counts_padding_of_training_batches_only():
    info = TaskInfo("t", "seq2seq", src_vocab_size=9, tgt_vocab_size=9, max_src_len=8, max_tgt_len=8)
    model = build_transformer(info, {"d_model": 8, "n_heads": 2, "d_ff": 8, "n_enc_layers": 1, "n_dec_layers": 1})
    from ndtrain.engine import ParamStore
    ParamStore.from_module(model.module, seed=0)
    src = np.array([[5, 6, 7, 0], [5, 0, 0, 0]])
    tgt_in = np.array([[2, 5, 0], [2, 5, 6]])
    tgt_out = np.array([[5, 3, 0], [5, 6, 3]])
    batch = {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
    assert model.pad_stats() == {}  # nothing trained yet
    model.loss(batch, train=True)
    model.loss(batch, train=False)  # evaluation batches are not training compute
    assert model.pad_stats() == {"pad_fraction": pytest.approx(5 / 14)}  # 4 + 1 pads of 8 + 6 positions
    assert model.pad_stats() == {}  # reset: a window starts afresh
    model.loss(batch, train=True)
    assert model.pad_stats(TwoRanks([1, 10])) == {"pad_fraction": pytest.approx(6 / 24)}  # summed over ranks


def expected_pad_fractions(argv_sets, steps=6, window=2):
    """The same windows recomputed from the run's loader: (PAD in src + tgt_in) / their sizes."""
    cfg = apply_overrides(Config(), ["run.task=\"reverse\"", "run.model=\"transformer\"", "run.batch_size=16",
                                     "run.seed=2", "data.rows=400", *argv_sets])
    _, train, _ = load_task_data(cfg)
    it = iter(make_loader(train, cfg, 0, 1))
    out = []
    for _ in range(steps // window):
        pads = size = 0
        for _ in range(window):
            b = next(it)
            pads += int((b["src"] == PAD).sum() + (b["tgt_in"] == PAD).sum())
            size += b["src"].size + b["tgt_in"].size
        out.append(pads / size)
    return out


def test_metrics_jsonl_has_pad_fraction_per_record(tmp_path):
    plain = tmp_path / "plain"
    bucketed = tmp_path / "bucketed"
    base = tmp_path / "base.toml"
    base.write_text("# defaults + flags\n")
    assert main(["train", "--config", str(base), *TINY, "--out", str(plain)]) == 0
    assert main(["train", "--config", str(base), *TINY, "--set", "data.bucket=true", "--out", str(bucketed)]) == 0
    got_plain = [r["pad_fraction"] for r in train_events(read_metrics(plain))]
    got_bucketed = [r["pad_fraction"] for r in train_events(read_metrics(bucketed))]
    np.testing.assert_allclose(got_plain, expected_pad_fractions([]), rtol=1e-12)
    np.testing.assert_allclose(got_bucketed, expected_pad_fractions(["data.bucket=true"]), rtol=1e-12)
    assert max(got_bucketed) < 0.5 * min(got_plain)


def test_no_pad_fraction_for_models_without_padding(tmp_path):
    out = tmp_path / "xor"
    assert main(["train", "--task", "xor", "--model", "mlp", "--steps", "4", "--set", "run.log_every=2",
                 "--quiet", "--out", str(out)]) == 0
    assert all("pad_fraction" not in r for r in train_events(read_metrics(out)))
