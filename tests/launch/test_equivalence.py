"""Data-parallel equivalence through `ndtrain train`: the same command (same global --batch-size, seed, 20 steps)
with W = 2 workers under MPI and under Ray ends with the parameters of W = 1, within 1e-6 relative in float64 and
close in float32. Compared on the final checkpoints, for the MLP (digits) and the seq2seq transformer (reverse).

Why it can hold exactly: every rank starts from rank 0's broadcast, the loss is normalised by the GLOBAL target
count, the gradient is the sum over ranks, and the optimizer arithmetic is the same on every rank; only the order
of floating-point additions differs (one batch of B rows vs two of B/2, then a sum), so float64 agrees to ~1e-12
(measured: MLP 1e-16, transformer 4e-11).

float32 runs use SGD with momentum, not Adam: a parameter whose true gradient is zero (the attention KEY bias:
softmax ignores a shift shared by all keys) gets a float32 rounding-noise gradient of ~1e-9 that Adam divides by
its own magnitude into lr-sized steps of random sign, so W=1 and W=2 Adam runs differ there by ~1% (measured on
decoder.*.cross_attn.b_kv) while every other parameter agrees to ~1e-6. That is Adam on noise, not a cluster
error; SGD keeps the rounding at rounding size (measured ~4e-7)."""
import json

import numpy as np
import pytest

from ndtrain.cluster import checkpoint as ckpt
from ndtrain.launch import cli
from helpers.runs import TINY_TRANSFORMER

STEPS = 20
# tiny sizes: a test must stay well under ~30 s on a loaded 2-core machine. dropout 0: W ranks draw different masks
TRANSFORMER = ["--task", "reverse", "--model", "transformer", "--batch-size", "16", *TINY_TRANSFORMER,
               "--set", "model.dropout=0.0", "--set", "data.rows=256"]
MLP = ["--task", "digits", "--model", "mlp", "--batch-size", "32", "--set", "model.hidden=[32]",
       "--set", "model.dropout=0.0"]  # the digits preset has dropout 0.2
MODELS = {"mlp": MLP, "transformer": TRANSFORMER}
# float64: the bound. float32 ("close"): rounding of a differently ordered sum, 20 SGD steps (measured 5e-7)
TOL = {"float64": 1e-6, "float32": 1e-5}
FLOAT32_OPTIM = ["--set", 'optim.name="sgd"', "--set", "optim.momentum=0.9", "--set", "optim.lr=0.05"]


def train_argv(model: str, dtype: str, out, backend: str = "local", workers: int = 1) -> list[str]:
    """One `ndtrain train` command line; only --backend/--workers/--out differ between the runs compared.
    An empty --config: defaults + these flags, whatever the task's preset (configs/<task>.toml) says."""
    base = out.parent / "base.toml"
    base.write_text("# defaults + command-line flags only\n")
    argv = ["train", "--config", str(base), *MODELS[model], "--steps", str(STEPS), "--seed", "3", "--threads", "1",
            "-q",
            "--set", f'run.dtype="{dtype}"', "--set", "optim.lr=0.01", "--set", "cluster.bucket_mb=0.01",
            "--backend", backend, "--out", str(out)]
    if dtype == "float32":
        argv += FLOAT32_OPTIM  # later --set wins: SGD replaces adamw (see the module docstring)
    if backend != "local":
        argv += ["--workers", str(workers)]
    return argv


def final_params(out) -> dict[str, np.ndarray]:
    c = ckpt.load(out / "checkpoints")
    assert c.step == STEPS, f"{out}: final checkpoint is at step {c.step}, expected {STEPS}"
    return c.params


def max_rel_diff(a: dict, b: dict) -> float:
    """max over parameters of ||b - a|| / ||a|| (per-tensor relative error)."""
    assert sorted(a) == sorted(b)
    return max(float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a)


def check_equivalent(tmp_path, model: str, dtype: str, backend: str) -> float:
    one, two = tmp_path / "w1", tmp_path / f"w2-{backend}"
    assert cli.main(train_argv(model, dtype, one)) == 0
    assert cli.main(train_argv(model, dtype, two, backend, 2)) == 0
    topo = json.loads((two / "topology.json").read_text())
    assert topo["backend"] == backend and topo["ranks"] == 2
    a, b = final_params(one), final_params(two)
    assert a[next(iter(a))].dtype == np.dtype(dtype) == b[next(iter(b))].dtype
    err = max_rel_diff(a, b)
    print(f"{model} {dtype} {backend}: max relative difference {err:.3g}")
    assert err <= TOL[dtype], f"{model} {dtype} {backend}: W=2 differs from W=1 by {err:.3g} relative"
    return err


def _moved(tmp_path, model):
    """A run with another seed ends elsewhere by far more than the tolerance (the check can fail)."""
    argv = train_argv(model, "float64", tmp_path / "other")
    argv[argv.index("--seed") + 1] = "4"
    assert cli.main(argv) == 0
    return max_rel_diff(final_params(tmp_path / "w1"), final_params(tmp_path / "other"))


# -- MPI -----------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", [pytest.param("mlp", marks=pytest.mark.slow), "transformer"])
def test_mpi_two_workers_equal_one_float64(mpi_ok, tmp_path, model):
    check_equivalent(tmp_path, model, "float64", "mpi")
    assert _moved(tmp_path, model) > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_mpi_two_workers_close_to_one_float32(mpi_ok, tmp_path, model):
    check_equivalent(tmp_path, model, "float32", "mpi")


# -- Ray (the ray_session fixture, one Ray session per module, is in conftest.py) ----------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", [pytest.param("mlp", marks=pytest.mark.slow), "transformer"])
def test_ray_two_workers_equal_one_float64(ray_session, tmp_path, model):
    check_equivalent(tmp_path, model, "float64", "ray")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_ray_two_workers_close_to_one_float32(ray_session, tmp_path, model):
    check_equivalent(tmp_path, model, "float32", "ray")
