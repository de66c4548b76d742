"""Deterministic mode: the fixed summation tree alone, the micro-batch partition, and bitwise-equal final
parameters for W = 1, 2, 4 (thread ranks; MPI in a slow test)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.cluster.comm.local import LocalCommunicator
from ndtrain.cluster.deterministic import (MicroBatchLoader, TreeSum, allgather_rows, block_of, canonical_zeros,
                                           dyadic_nodes,
                                           global_tree_sum, split_rows, tree_sum)
from ndtrain.launch.worker import run_worker
from ndtrain.data import tasks
from ndtrain.data.dataset import as_dataset
from ndtrain.launch.config import ConfigError
from helpers.threads import ThreadComm, ThreadGroup, run_threads
from helpers.runs import make_cfg


def _explicit_tree(xs):
    """The balanced tree written out by recursion: the definition TreeSum must follow."""
    if len(xs) == 1:
        return xs[0].copy()
    h = len(xs) // 2
    return _explicit_tree(xs[:h]) + _explicit_tree(xs[h:])


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_tree_sum_is_the_balanced_pairwise_tree(n):
    rng = np.random.default_rng(n)
    # magnitudes spread over many decades: different orders of addition give different bits
    xs = [(rng.standard_normal(64) * 10.0 ** rng.integers(-8, 8, 64)).astype(np.float32) for _ in range(n)]
    got = tree_sum(xs)
    assert got.tobytes() == _explicit_tree(xs).tobytes()
    if n >= 4:
        sequential = xs[0].copy()
        for x in xs[1:]:
            sequential += x
        assert sequential.tobytes() != got.tobytes()  # the test data does tell summation orders apart


def test_tree_sum_does_not_modify_leaves_and_rejects_other_counts():
    xs = [np.full(3, float(i)) for i in range(4)]
    copies = [x.copy() for x in xs]
    assert tree_sum(xs).tolist() == [6.0, 6.0, 6.0]
    assert all((a == b).all() for a, b in zip(xs, copies))
    t = TreeSum()
    for x in xs[:3]:
        t.push(x)
    with pytest.raises(ValueError, match="3 leaves"):
        t.result()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_subtrees_then_top_of_tree_equal_the_whole_tree(world):
    """Each rank reduces its aligned block, then the W roots are combined: the same bits as one rank over all M."""
    M = 8
    rng = np.random.default_rng(7)
    leaves = [(rng.standard_normal(50) * 10.0 ** rng.integers(-6, 6, 50)).astype(np.float32) for _ in range(M)]
    roots = [tree_sum([leaves[i] for i in block_of(r, world, M)]) for r in range(world)]
    assert tree_sum(roots).tobytes() == tree_sum(leaves).tobytes()


@pytest.mark.parametrize("world", [3, 5, 6, 7])
def test_any_world_up_to_m_gives_the_same_bits_as_one_rank(world):
    """W that does not divide M: ranks reduce aligned runs of their blocks, the nodes above are added pairwise."""
    import threading
    M = 8
    rng = np.random.default_rng(11)
    leaves = [(rng.standard_normal(40) * 10.0 ** rng.integers(-6, 6, 40)).astype(np.float32) for _ in range(M)]
    group, out = ThreadGroup(world), [None] * world

    def target(r):
        roots = [tree_sum(leaves[i << lv:(i + 1) << lv]) for lv, i in dyadic_nodes(block_of(r, world, M))]
        out[r] = global_tree_sum(ThreadComm(group, r), roots, M)

    ts = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    whole = canonical_zeros(tree_sum(leaves))
    assert all(o is not None and o.tobytes() == whole.tobytes() for o in out)
    assert dyadic_nodes(range(2, 5)) == [(1, 1), (0, 4)] and dyadic_nodes(range(0, 8)) == [(3, 0)]


def test_block_of_and_split_rows():
    assert [list(block_of(r, 4, 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(block_of(r, 3, 8)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]  # rank_share's rule
    with pytest.raises(ValueError):
        block_of(0, 9, 8)
    parts = split_rows(np.arange(12), 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError):
        split_rows(np.arange(10), 4)


def test_canonical_zeros_only_changes_the_sign_of_zero():
    x = np.array([-0.0, 0.0, -1.5, np.nan, -np.inf, 1e-45], dtype=np.float32)
    y = canonical_zeros(x.copy())
    assert not np.signbit(y[0]) and y[2] == -1.5 and np.isnan(y[3]) and y[4] == -np.inf and y[5] == x[5]


def test_allgather_rows_and_global_tree_sum_over_thread_ranks():
    import threading
    W = 4
    group = ThreadGroup(W)
    rng = np.random.default_rng(3)
    mine = [(rng.standard_normal(33) * 1e5).astype(np.float32) for _ in range(W)]
    rows, sums = [None] * W, [None] * W

    def target(r):
        comm = ThreadComm(group, r)
        rows[r] = allgather_rows(comm, mine[r])
        sums[r] = global_tree_sum(comm, [mine[r].copy()], W)

    ts = [threading.Thread(target=target, args=(r,)) for r in range(W)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    for r in range(W):
        assert rows[r].tobytes() == np.stack(mine).tobytes()  # exact: one value and zeros per column
        assert sums[r].tobytes() == tree_sum(mine).tobytes()
    assert allgather_rows(LocalCommunicator(), mine[0]).shape == (1, 33)


def test_micro_batches_do_not_depend_on_world_size():
    """Rank r of W gets micro-batches block_of(r, W, M) of global batch k, each built from its own rows only."""
    ds = as_dataset(tasks.generate("spirals", None, 0, "train"))
    one = MicroBatchLoader(ds, 32, 0, 1, seed=5, micro_batches=8)
    all_mb = one.make_batch(0, 3)
    assert len(all_mb) == 8 and all(len(mb["y"]) == 4 for mb in all_mb)
    for W in (2, 4):
        got = [mb for r in range(W) for mb in MicroBatchLoader(ds, 32, r, W, 5, 8).make_batch(0, 3)]
        assert all(a["x"].tobytes() == b["x"].tobytes() for a, b in zip(all_mb, got)) and len(got) == 8
    it = iter(MicroBatchLoader(ds, 32, 1, 2, 5, 8))
    next(it)
    assert it is not None and one.state_dict() == {"epoch": 0, "batches_done": 0}


SETS = ["run.task=\"spirals\"", "run.steps=12", "run.batch_size=32", "model.hidden=[16, 16]",
        "model.dropout=0.1", "optim.grad_clip=1.0", "run.deterministic=true", "run.micro_batches=4",
        "run.checkpoint_every=6"]


def _final(out):
    return ckpt.load(Path(out) / "checkpoints")


def test_bitwise_equal_for_1_2_3_4_thread_ranks(tmp_path):
    """float32, dropout, clipping, AdamW: the final parameters and optimizer moments are the same bits for
    W = 1, 2, 3, 4 (3 does not divide the 4 micro-batches); the default mode (control) is not bitwise equal between
    W = 1 and 2."""
    run_worker(make_cfg(tmp_path / "w1", *SETS), LocalCommunicator())
    ref = _final(tmp_path / "w1")
    for W in (2, 3, 4):
        _, errs = run_threads([make_cfg(tmp_path / f"w{W}", *SETS, workers=W) for _ in range(W)])
        assert errs == [None] * W
        got = _final(tmp_path / f"w{W}")
        for k in ref.params:
            assert got.params[k].tobytes() == ref.params[k].tobytes(), (W, k)
        assert got.optim["exp_avg"].tobytes() == ref.optim["exp_avg"].tobytes()
    default = [s for s in SETS if "deterministic" not in s and "micro" not in s] + ["model.dropout=0.0"]
    run_worker(make_cfg(tmp_path / "d1", *default), LocalCommunicator())
    _, errs = run_threads([make_cfg(tmp_path / "d2", *default, workers=2) for _ in range(2)])
    a, b = _final(tmp_path / "d1"), _final(tmp_path / "d2")
    assert errs == [None, None]
    assert any(a.params[k].tobytes() != b.params[k].tobytes() for k in a.params)


def test_deterministic_mode_resumes_bitwise_across_world_sizes(tmp_path):
    """12 steps on 1 rank == 6 steps on 2 ranks, then resume on 1 rank (and 6 on 1, resume on 4): same bits."""
    run_worker(make_cfg(tmp_path / "full", *SETS), LocalCommunicator())
    ref = _final(tmp_path / "full")
    _, errs = run_threads([make_cfg(tmp_path / "a", *SETS, "run.steps=6", workers=2) for _ in range(2)])
    assert errs == [None, None]
    first = ckpt.latest(tmp_path / "a" / "checkpoints")
    run_worker(make_cfg(tmp_path / "a", *SETS, f"run.resume={json.dumps(str(first))}"), LocalCommunicator())
    run_worker(make_cfg(tmp_path / "b", *SETS, "run.steps=6"), LocalCommunicator())
    _, errs = run_threads([make_cfg(tmp_path / "b", *SETS, f"run.resume={json.dumps(str(tmp_path / 'b'))}",
                                    workers=4) for _ in range(4)])
    assert errs == [None] * 4
    for out in ("a", "b"):
        got = _final(tmp_path / out)
        assert got.step == 12
        assert all(got.params[k].tobytes() == ref.params[k].tobytes() for k in ref.params), out


@pytest.mark.parametrize("sets, field", [
    (["run.micro_batches=6"], "run.micro_batches"),
    (["run.batch_size=36"], "run.batch_size"),
])
def test_deterministic_config_is_checked(tmp_path, sets, field):
    with pytest.raises(ConfigError, match=field):
        make_cfg(tmp_path, "run.deterministic=true", "run.micro_batches=8", *sets)


def test_more_workers_than_micro_batches_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="run.micro_batches"):
        make_cfg(tmp_path, "run.deterministic=true", "run.micro_batches=2", "run.batch_size=12", workers=3)
    assert make_cfg(tmp_path, "run.deterministic=true", "run.micro_batches=4", "run.batch_size=12", workers=3)


def _mpi_usable() -> bool:
    exe = Path(sys.executable).with_name("mpiexec")
    return exe.exists() or shutil.which("mpiexec") is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mpi_two_and_four_workers_bitwise_equal_one(tmp_path):
    """Through `ndtrain train --backend mpi` (real processes, MPI all-reduce): W = 2 and W = 4 (oversubscribed)."""
    if not _mpi_usable():
        pytest.skip("no mpiexec")
    args = ["--task", "spirals", "--model", "mlp", "--steps", "10", "--batch-size", "32", "-q",
            "--set", "model.hidden=[16,16]", "--set", "model.dropout=0.1", "--set", "run.deterministic=true",
            "--set", "run.micro_batches=4"]
    outs = {}
    for W in (1, 2, 4):
        out = tmp_path / f"w{W}"
        backend = ["--backend", "mpi", "--workers", str(W)] if W > 1 else []
        r = subprocess.run([sys.executable, "-m", "ndtrain.launch", "train", "--out", str(out), *args, *backend],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[W] = _final(out)
    for W in (2, 4):
        for k in outs[1].params:
            assert outs[W].params[k].tobytes() == outs[1].params[k].tobytes(), (W, k)
