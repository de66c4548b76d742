"""`ndtrain bench engine` pieces (no timing here): the FLOP counts of ANCHORS.md, one real training step of the
benchmarked network lowering its loss, the allocator setting, and the `ndtrain bench` dispatch."""
import numpy as np
import pytest

from ndtrain.engine.losses import cross_entropy_fused
from ndtrain.launch.bench import engine as bench
from ndtrain.launch.cli import main


def test_flop_counts_match_the_anchors():
    assert bench.gflop_per_step(bench.CONFIGS["S"]) == pytest.approx(11.98, abs=0.01)
    assert bench.gflop_per_step(bench.CONFIGS["M"]) == pytest.approx(85.36, abs=0.01)
    assert bench.gflop_per_step(bench.CONFIGS["MLP"]) == pytest.approx(0.180, abs=0.001)


@pytest.mark.parametrize("kind", ["seq2seq", "lm", "mlp"])
def test_benchmarked_network_trains(kind):
    """A scaled-down config of each kind: repeated steps on one batch lower its loss (so the timed step is a real
    training step: forward, loss, backward, AdamW)."""
    c = {"seq2seq": dict(kind="seq2seq", d=16, h=2, ff=32, layers=(1, 1), vocab=12, batch=4, len=6),
         "lm": dict(kind="lm", d=16, h=2, ff=32, layers=(0, 2), vocab=12, batch=4, len=6),
         "mlp": dict(kind="mlp", sizes=(10, 8, 3), batch=16)}[kind]
    batch = bench._data(c, np.random.default_rng(0))
    _, model, step = bench.build_ndtrain(c)

    def loss():
        if kind == "seq2seq":
            logits, _ = model(batch["src"], batch["tgt_in"], train=False)
            target = batch["tgt_out"]
        else:
            logits, _ = model(batch["x"], train=False)
            target = batch["y"]
        s, n, _ = cross_entropy_fused(logits, target, ignore_index=0)
        return s / n

    before = loss()
    for _ in range(40):
        step(batch)
    assert loss() < 0.97 * before


def test_bench_dispatch_rejects_unknown_names(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no_such_benchmark'" in err and "engine" in err
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--configs"])  # the benchmark's own parser handles its arguments


def test_gemm_floor_lists_the_products_of_a_step():
    """The floor's product list carries exactly the step's FLOPs: all of S (T = 32: attention is one block), and for
    M the 2-D products plus the causal blocks' 62.5% of the full attention products (keys 32+64+96+128 of 4*128)."""
    from ndtrain.launch.bench import gemm_floor
    S, M = bench.CONFIGS["S"], bench.CONFIGS["M"]
    assert gemm_floor.gflop(gemm_floor.gemm_list(S)) == pytest.approx(bench.gflop_per_step(S), rel=1e-12)
    d, B, T, L = M["d"], M["batch"], M["len"], M["layers"][1]
    attn_full = B * 12 * d * L * T * T / 1e9
    expected = bench.gflop_per_step(M) - attn_full + 0.625 * attn_full
    assert gemm_floor.gflop(gemm_floor.gemm_list(M)) == pytest.approx(expected, rel=1e-12)
    tiny = dict(kind="seq2seq", d=8, h=2, ff=16, layers=(1, 1), vocab=10, batch=2, len=4)
    seconds, _, _ = gemm_floor.make_replay(tiny)(None)
    assert seconds > 0
