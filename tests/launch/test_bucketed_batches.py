"""data.bucket / data.max_tokens through the config (launch/task_data.make_loader): the global batch is the same for
W = 1 and W = 2 (the ranks' shares, concatenated in rank order, ARE the W = 1 batch, row for row), resume from a
loader state gives the remaining batches on any W, padding shrinks, and bad settings are ConfigErrors."""
import itertools

import numpy as np
import pytest

from ndtrain.launch.task_data import make_loader
from ndtrain.data.dataset import from_columns
from ndtrain.data.info import PAD, TaskInfo
from ndtrain.launch.config import Config, ConfigError, apply_overrides, validate


def seq_dataset(n=300, seed=0):
    """Row i's first source token is 4 + i, so a batch names its rows; lengths 1..30 (a long tail as Multi30k)."""
    rng = np.random.default_rng(seed)
    lens = np.minimum(1 + rng.geometric(0.12, n), 30)
    src = [np.concatenate([[4 + i], rng.integers(4, 50, l - 1)]).astype(np.int32) for i, l in enumerate(lens)]
    tgt = [rng.integers(4, 50, max(1, l + int(rng.integers(-2, 3)))).astype(np.int32) for l in lens]
    info = TaskInfo("seq", "seq2seq", src_vocab_size=10_000, tgt_vocab_size=50)
    return from_columns(info, {"src": src, "tgt": tgt})


def cfg_with(*overrides, workers=1):
    cfg = apply_overrides(Config(), ["run.task=\"seq\"", "run.batch_size=32", "run.seed=7", *overrides])
    if workers > 1:
        cfg.run.backend, cfg.run.workers = "mpi", workers
    return validate(cfg)


def row_ids(batch):
    return batch["src"][:, 0].astype(np.int64) - 4


MODES = {"bucket": ["data.bucket=true"], "bucket2": ["data.bucket=true", "data.bucket_batches=2"],
         "max_tokens": ["data.max_tokens=300", "data.rows_multiple=4"]}


def global_batches(ds, cfg, W, n, state=None):
    """The first n global batches as served to W ranks: (row ids in rank order, the ranks' batch dicts)."""
    loaders = [make_loader(ds, cfg, r, W) for r in range(W)]
    if state is not None:
        for L in loaders:
            L.load_state_dict(state)
    its = [iter(L) for L in loaders]
    out = []
    for _ in range(n):
        parts = [next(it) for it in its]
        out.append((np.concatenate([row_ids(p) for p in parts]), parts))
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_global_batch_independent_of_workers_and_resume(mode):
    ds = seq_dataset()
    one, _ = global_batches(ds, cfg_with(*MODES[mode]), 1, 30)  # > one epoch: crosses an epoch end
    two, _ = global_batches(ds, cfg_with(*MODES[mode], workers=2), 2, 30)
    assert len(make_loader(ds, cfg_with(*MODES[mode]), 0, 1)) < 30
    for (a, _), (b, parts) in zip(one, two):
        np.testing.assert_array_equal(a, b)  # the union of the rank slices = the W=1 batch, same order
        assert all(len(p["src"]) for p in parts)  # no rank is left without rows
    # resume after 9 batches (state from W=2) on W=1 and W=2: the remaining batches, unchanged
    head, state = global_batches(ds, cfg_with(*MODES[mode], workers=2), 2, 9)
    for W in (1, 2):
        tail, _ = global_batches(ds, cfg_with(*MODES[mode], workers=W), W, 21, state=state)
        for (a, _), (b, _) in zip(one, head + tail):
            np.testing.assert_array_equal(a, b)


def pad_share(batches):
    pads = sum(int(np.count_nonzero(p["tgt_out"] == PAD)) for _, parts in batches for p in parts)
    return pads / sum(p["tgt_out"].size for _, parts in batches for p in parts)


def test_bucket_batches_reaches_the_loader():
    """Sorting within chunks of 2 batches mixes lengths more than within chunks of 50: other batches, more padding."""
    ds = seq_dataset()
    wide, _ = global_batches(ds, cfg_with(*MODES["bucket"]), 1, 9)
    narrow, _ = global_batches(ds, cfg_with(*MODES["bucket2"]), 1, 9)
    assert any(len(a) != len(b) or (a != b).any() for (a, _), (b, _) in zip(wide, narrow))
    assert pad_share(narrow) > pad_share(wide)


@pytest.mark.parametrize("mode", ["bucket", "max_tokens"])
def test_bucketed_batches_pad_less(mode):
    ds = seq_dataset()
    plain, _ = global_batches(ds, cfg_with(), 1, 9)
    bucketed, _ = global_batches(ds, cfg_with(*MODES[mode]), 1, 9)
    assert pad_share(plain) > 0.3
    assert pad_share(bucketed) < 0.5 * pad_share(plain)


def test_max_tokens_batches_keep_the_budget():
    ds = seq_dataset()
    batches, _ = global_batches(ds, cfg_with(*MODES["max_tokens"]), 1, 9)
    for _, (b,) in batches:
        assert len(b["src"]) % 4 == 0 and len(b["src"]) <= 32
        assert len(b["src"]) == 4 or len(b["src"]) * (b["tgt_out"].shape[1] - 1) <= 300


def test_bad_settings_name_the_field():
    lm = from_columns(TaskInfo("lm", "lm", tgt_vocab_size=20, max_tgt_len=8), {"tokens": np.arange(400) % 20})
    with pytest.raises(ConfigError, match="^data.bucket: .*seq2seq"):
        make_loader(lm, cfg_with("data.bucket=true"), 0, 1)
    with pytest.raises(ConfigError, match="^data.rows_multiple: "):
        cfg_with("data.max_tokens=300", "data.rows_multiple=1", workers=2)
    cfg = cfg_with("data.max_tokens=300", "run.deterministic=true")
    with pytest.raises(ConfigError, match="^data.max_tokens: deterministic"):
        make_loader(seq_dataset(), cfg, 0, 1)


def test_deterministic_mode_takes_bucketed_batches():
    ds = seq_dataset()
    cfg = cfg_with("data.bucket=true", "run.deterministic=true", "run.micro_batches=4")
    L = make_loader(ds, cfg, 0, 1)
    ref = make_loader(ds, cfg_with("data.bucket=true"), 0, 1)
    for micro, whole in itertools.islice(zip(L, ref), 5):
        np.testing.assert_array_equal(np.concatenate([row_ids(m) for m in micro]), row_ids(whole))


@pytest.mark.timeout(180)
def test_bucketed_training_two_mpi_workers_equal_one(mpi_ok, tmp_path):
    """End to end through `ndtrain train` with data.bucket = true: 2 MPI workers end with the parameters of 1 worker
    (float64, 1e-6 relative, as tests/launch/test_equivalence.py), and both logged the same pad_fraction."""
    from ndtrain.cluster import checkpoint as ckpt
    from ndtrain.launch import cli
    from ndtrain.launch.rundir import read_metrics, train_events
    base = tmp_path / "base.toml"
    base.write_text("# defaults + flags\n")
    argv = ["train", "--config", str(base), "--task", "reverse", "--model", "transformer", "--batch-size", "16",
            "--steps", "8", "--seed", "3", "--threads", "1", "-q", "--set", "model.d_model=16",
            "--set", "model.n_heads=2", "--set", "model.d_ff=32", "--set", "model.n_enc_layers=1",
            "--set", "model.n_dec_layers=1", "--set", "model.dropout=0.0", "--set", "data.rows=256",
            "--set", 'run.dtype="float64"', "--set", "optim.lr=0.01", "--set", "data.bucket=true",
            "--set", "run.log_every=4"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert cli.main([*argv, "--out", str(one)]) == 0
    assert cli.main([*argv, "--backend", "mpi", "--workers", "2", "--out", str(two)]) == 0
    a, b = ckpt.load(one / "checkpoints").params, ckpt.load(two / "checkpoints").params
    err = max(float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a)
    assert err <= 1e-6, f"W=2 differs from W=1 by {err:.3g} relative"
    pf1 = [r["pad_fraction"] for r in train_events(read_metrics(one))]
    pf2 = [r["pad_fraction"] for r in train_events(read_metrics(two))]
    # each rank pads its own share to its own longest row: W=2 computes no more padding than W=1, summed exactly
    assert len(pf1) == len(pf2) == 2 and all(0 <= y <= x for x, y in zip(pf1, pf2))
