"""Loader: rank-disjoint global batches, exact resume (same and different W), eval passes, batching modes."""
import itertools

import numpy as np
import pytest

from ndtrain.data.columns import RaggedColumn
from ndtrain.data.dataset import from_columns
from ndtrain.data.info import BOS, EOS, PAD, TaskInfo
from ndtrain.data.loader import Loader


def ids_dataset(n, kind="classification"):
    """x[i] = i, so a batch names its rows."""
    info = TaskInfo("ids", kind, n_features=1, n_outputs=2)
    return from_columns(info, {"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n) % 2})


def rows(batch):
    return batch["x"][:, 0].astype(np.int64)


def seq_dataset(lengths, tgt_lengths=None, seed=0):
    rng = np.random.default_rng(seed)
    tgt_lengths = lengths if tgt_lengths is None else tgt_lengths
    # row i's first source token encodes i (ids >= 4), so batches name their rows
    src = [np.concatenate([[4 + i], rng.integers(4, 20, max(l - 1, 0))]).astype(np.int32)[:l] if l else
           np.zeros(0, np.int32) for i, l in enumerate(lengths)]
    tgt = [rng.integers(4, 20, l).astype(np.int32) for l in tgt_lengths]
    info = TaskInfo("seq", "seq2seq", src_vocab_size=10_000, tgt_vocab_size=20)
    return from_columns(info, {"src": src, "tgt": tgt})


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_union_of_ranks_is_each_row_once(W, drop_last):
    n, B = 103, 12
    ds = ids_dataset(n)
    loaders = [Loader(ds, B, rank=r, world_size=W, seed=5, drop_last=drop_last, endless=False) for r in range(W)]
    per_rank = [[rows(b) for b in L] for L in loaders]
    assert len({len(p) for p in per_rank}) == 1  # every rank gets the same number of batches
    K = len(per_rank[0])
    assert K == (n // B if drop_last else -(-n // B)) == loaders[0].epoch_batches
    served = []
    for k in range(K):
        union = np.concatenate([per_rank[r][k] for r in range(W)])
        np.testing.assert_array_equal(union, loaders[0].global_batch_rows(0, k))  # union = global batch k
        served.append(union)
    served = np.concatenate(served)
    assert len(np.unique(served)) == len(served)  # no row twice
    assert len(served) == (K * B if drop_last else n)
    # the global order does not depend on W
    one = Loader(ds, B, seed=5, drop_last=drop_last, endless=False)
    np.testing.assert_array_equal(served, np.concatenate([rows(b) for b in one]))


def test_epochs_differ_and_endless_iteration():
    L = Loader(ids_dataset(40), 8, seed=1)
    first = [rows(b) for b in itertools.islice(L, 12)]  # 5 batches per epoch: crosses two epoch ends
    assert L.state_dict() == {"epoch": 2, "batches_done": 2}
    e0, e1 = np.concatenate(first[:5]), np.concatenate(first[5:10])
    assert sorted(e0) == list(range(40)) == sorted(e1) and not np.array_equal(e0, e1)


@pytest.mark.parametrize("W_after", [1, 2, 4])
@pytest.mark.parametrize("mode", ["fixed", "bucket", "tokens"])
def test_resume_gives_the_remaining_batches(W_after, mode):
    lengths = np.random.default_rng(0).integers(1, 15, 150)
    ds = seq_dataset(lengths)
    kw = {"fixed": {}, "bucket": {"bucket": True, "bucket_batches": 3}, "tokens": {"max_tokens": 80,
                                                                                   "rows_multiple": 4}}[mode]
    B = 16

    def global_rows(W, state=None, n=None):
        loaders = [Loader(ds, B, rank=r, world_size=W, seed=2, **kw) for r in range(W)]
        if state:
            for L in loaders:
                L.load_state_dict(state)
        its = [iter(L) for L in loaders]
        out = []
        for _ in range(n):
            out.append(np.concatenate([next(it)["src"][:, 0] for it in its]))
        return out, loaders[0].state_dict()

    full, _ = global_rows(2, n=25)  # crosses an epoch end
    head, state = global_rows(2, n=7)
    tail, _ = global_rows(W_after, state=state, n=18)
    for a, b in zip(full, head + tail):
        np.testing.assert_array_equal(a, b)


def test_resume_with_prefetch_counts_consumed_batches():
    ds = ids_dataset(64)
    L = Loader(ds, 8, seed=3, prefetch=3)
    it = iter(L)
    got = [rows(next(it)) for _ in range(3)]
    state = L.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}  # not what the thread prefetched
    it.close()
    R = Loader(ds, 8, seed=3)
    R.load_state_dict(state)
    ref = Loader(ds, 8, seed=3)
    expected = [rows(b) for b in itertools.islice(ref, 6)]
    resumed = [rows(b) for b in itertools.islice(R, 3)]
    for a, b in zip(expected, got + resumed):
        np.testing.assert_array_equal(a, b)


def test_prefetch_forwards_errors():
    ds = ids_dataset(16)
    L = Loader(ds, 4, prefetch=2)

    def boom(*a, **k):
        raise RuntimeError("broken row")

    ds.batch = boom
    with pytest.raises(RuntimeError, match="broken row"):
        next(iter(L))


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_eval_serves_every_row_once_per_pass(W):
    ds = ids_dataset(10)
    loaders = [Loader.for_eval(ds, 4, rank=r, world_size=W) for r in range(W)]
    for _ in range(2):  # two passes, each complete
        parts = [[rows(b) for b in L] for L in loaders]
        assert len({len(p) for p in parts}) == 1
        union = np.concatenate([np.concatenate(p) for p in zip(*parts)])
        np.testing.assert_array_equal(np.sort(union), np.arange(10))
        np.testing.assert_array_equal(union, np.arange(10))  # in order, unpadded


def test_bad_state_and_bad_args():
    L = Loader(ids_dataset(16), 4)
    with pytest.raises(ValueError, match="batches_done"):
        L.load_state_dict({"epoch": 0, "batches_done": 9})
    with pytest.raises(ValueError, match="rank"):
        Loader(ids_dataset(16), 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batch"):
        Loader(ids_dataset(3), 4)


def test_seq2seq_padding_edges():
    # lengths 1, 0 (empty target), and one long row; PAD after, BOS first, EOS last
    ds = seq_dataset([1, 3, 5], tgt_lengths=[1, 0, 4])
    b = ds.batch(np.array([0, 1, 2]), masks=True)
    assert b["src"].shape == (3, 5) and b["tgt_in"].shape == (3, 5) and b["tgt_out"].shape == (3, 5)
    tgt = [ds.columns["tgt"].row(i) for i in range(3)]
    for i, t in enumerate(tgt):
        L = len(t)
        np.testing.assert_array_equal(b["tgt_in"][i, : L + 1], np.concatenate([[BOS], t]))
        np.testing.assert_array_equal(b["tgt_out"][i, : L + 1], np.concatenate([t, [EOS]]))
        assert (b["tgt_in"][i, L + 1:] == PAD).all() and (b["tgt_out"][i, L + 1:] == PAD).all()
        np.testing.assert_array_equal(b["tgt_pad_mask"][i], np.arange(5) > L)
        np.testing.assert_array_equal(b["src"][i, : len(ds.columns["src"].row(i))], ds.columns["src"].row(i))
    np.testing.assert_array_equal(b["tgt_out"][1], [EOS, 0, 0, 0, 0])  # empty target: just EOS
    np.testing.assert_array_equal(b["src_pad_mask"], b["src"] == PAD)
    # all rows of equal length: no padding column at all
    eq = seq_dataset([4, 4, 4]).batch(np.arange(3))
    assert eq["src"].shape == (3, 4) and (eq["src"] != PAD).all() and (eq["tgt_out"][:, -1] == EOS).all()
    # truncation to the model's capacity: max_tgt_len counts BOS
    cut = ds.batch(np.array([2]), max_src_len=2, max_tgt_len=3)
    assert cut["src"].shape == (1, 2) and cut["tgt_in"].shape == (1, 3)
    np.testing.assert_array_equal(cut["tgt_out"][0], np.concatenate([tgt[2][:2], [EOS]]))
    # max_tgt_len=1 leaves an empty target
    np.testing.assert_array_equal(ds.batch(np.array([2]), max_tgt_len=1)["tgt_out"], [[EOS]])


def test_multi_part_ragged_matches_single_part():
    rng = np.random.default_rng(1)
    row_list = [rng.integers(4, 50, rng.integers(0, 9)).astype(np.int32) for _ in range(30)]
    one = RaggedColumn.from_rows(row_list)
    parts = [RaggedColumn.from_rows(row_list[a:b]).parts[0] for a, b in [(0, 7), (7, 8), (8, 30)]]
    many = RaggedColumn(parts)
    idx = rng.permutation(30)[:12]
    for kw in ({}, {"bos": True}, {"eos": True, "max_len": 3}):
        np.testing.assert_array_equal(one.padded(idx, **kw), many.padded(idx, **kw))
    np.testing.assert_array_equal(one.lengths(idx), many.lengths(idx))


def test_bucketing_reduces_padding_and_token_budget():
    lengths = np.random.default_rng(0).integers(1, 40, 800)
    ds = seq_dataset(lengths)
    def pad_fraction(L):
        b = [x["src"] for x in L]
        return sum((x == PAD).sum() for x in b) / sum(x.size for x in b)
    plain = Loader(ds, 32, seed=0, endless=False)
    bucketed = Loader(ds, 32, seed=0, endless=False, bucket=True)
    assert pad_fraction(bucketed) < 0.5 * pad_fraction(plain)
    tb = Loader(ds, 64, seed=0, endless=False, max_tokens=400, rows_multiple=2, drop_last=False)
    seen = []
    for b in tb:
        seen.append(b["src"][:, 0] - 4)
        assert len(b["src"]) % 2 == 0
        assert len(b["src"]) <= 64
        assert len(b["src"]) * (b["tgt_in"].shape[1]) <= 400 or len(b["src"]) == 2
    seen = np.concatenate(seen)
    assert sorted(seen) == list(range(800))


def test_lm_blocks():
    stream = np.arange(4, 4 + 101, dtype=np.int32)
    ds = from_columns(TaskInfo("lm", "lm", tgt_vocab_size=200, max_tgt_len=10), {"tokens": [stream[:30], stream[30:]]})
    assert ds.n_rows() == 10  # (101 - 1) // 10
    L = Loader.for_eval(ds, 4)
    xs = [b for b in L]
    x = np.concatenate([b["x"] for b in xs])
    y = np.concatenate([b["y"] for b in xs])
    np.testing.assert_array_equal(x.ravel(), stream[:100])
    np.testing.assert_array_equal(y, x + 1)
    assert x.dtype == np.int32 and x.shape == (10, 10)
