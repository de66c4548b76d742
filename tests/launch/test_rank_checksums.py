"""Real `ndtrain train` jobs on 2 MPI ranks and 2 Ray actors, observed from inside the rank processes:
- every rank holds bit-identical parameters after EVERY step (ParamStore.checksum() per rank per step compared);
- a rank that raises mid-training is reported with its rank, step and traceback, and the job exits non-zero
  soon after (well within 30 s), nothing left hanging.

The probe is test-only: a `sitecustomize.py` written into a temporary directory on PYTHONPATH (inherited by
mpiexec's ranks and by the Ray workers started from this process) wraps `Trainer.__init__` of
ndtrain.cluster.trainer when that module is imported, so the optimizer step records the checksum and, when asked,
raises on one rank at one step. What it does is read at each run from the JSON file named by NDTRAIN_TEST_HOOKS.
No product code knows about it."""
import json
import os
import textwrap
import time

import pytest

from ndtrain.launch import cli
from helpers.runs import TINY_TRANSFORMER

SITECUSTOMIZE = textwrap.dedent('''
    """Test probe (tests/launch/test_rank_checksums.py): patches ndtrain.cluster.trainer.Trainer on import."""
    import importlib.abc
    import json
    import os
    import sys
    import time

    TARGET = "ndtrain.cluster.trainer"

    def _patch(module):
        Trainer = module.Trainer
        init = Trainer.__init__

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            with open(os.environ["NDTRAIN_TEST_HOOKS"]) as f:
                hooks = json.load(f)
            step_fn, sums = self.job.optimizer.step, []

            def step(lr):
                if self.rank == hooks.get("fail_rank") and self.step == hooks.get("fail_step"):
                    with open(hooks["fail_stamp"], "w") as f:
                        f.write(repr(time.time()))
                    raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")
                step_fn(lr)
                sums.append(self.store.checksum())
                if hooks.get("checksums_dir"):
                    path = os.path.join(hooks["checksums_dir"], f"rank{self.rank}.json")
                    with open(path + ".tmp", "w") as f:
                        json.dump({"rank": self.rank, "world": self.world, "checksums": sums}, f)
                    os.replace(path + ".tmp", path)
            self.job.optimizer.step = step
        Trainer.__init__ = __init__

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)
            spec.loader.exec_module = exec_and_patch
            return spec

    if os.environ.get("NDTRAIN_TEST_HOOKS"):
        sys.meta_path.insert(0, _Finder())
''')

STEPS = 12
TRANSFORMER = ["--task", "reverse", "--model", "transformer", "--batch-size", "16", "--seed", "1", "--threads", "1",
               *TINY_TRANSFORMER, "--set", "data.rows=256", "--set", "cluster.bucket_mb=0.01", "-q"]  # dropout stays on: per-rank masks must not matter


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    """Installs the probe for the rank processes of this module; returns write(dict) to set what it does."""
    d = tmp_path_factory.mktemp("probe")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    spec = d / "hooks.json"
    spec.write_text("{}")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "NDTRAIN_TEST_HOOKS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(d)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    os.environ["NDTRAIN_TEST_HOOKS"] = str(spec)

    def write(h: dict) -> None:
        spec.write_text(json.dumps(h))
    yield write
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def base_config(tmp_path) -> list[str]:
    """An empty --config: defaults + the flags, whatever the task's preset (configs/<task>.toml) says."""
    (tmp_path / "base.toml").write_text("# defaults + command-line flags only\n")
    return ["--config", str(tmp_path / "base.toml")]


def check_checksums(tmp_path, hooks, backend: str, extra: tuple = ()) -> None:
    sums_dir = tmp_path / "sums"
    sums_dir.mkdir()
    hooks({"checksums_dir": str(sums_dir)})
    argv = ["train", *base_config(tmp_path), *TRANSFORMER, "--steps", str(STEPS), "--backend", backend,
            "--workers", "2", "--out", str(tmp_path / "run"), *extra]
    assert cli.main(argv) == 0
    got = [json.loads((sums_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["world"] for g in got] == [2, 2]
    a, b = got[0]["checksums"], got[1]["checksums"]
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert x == y, f"{backend}: after step {step} rank 0 holds parameters {x}, rank 1 {y}"
    assert len(set(a)) == STEPS  # the parameters moved at every step: the comparison is not vacuous
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary.get("param_checksum", a[-1]) == a[-1]


def check_failure(tmp_path, hooks, capfd, backend: str) -> None:
    stamp = tmp_path / "failed_at"
    hooks({"fail_rank": 1, "fail_step": 3, "fail_stamp": str(stamp)})
    argv = ["train", *base_config(tmp_path), *TRANSFORMER, "--steps", "100000", "--backend", backend, "--workers", "2",
            "--out", str(tmp_path / "run")]
    rc = cli.main(argv)
    ended = time.time()
    err = capfd.readouterr().err
    assert rc != 0
    assert "rank 1 failed at step 3" in err, err[-3000:]
    assert "injected failure on rank 1 at step 3" in err and "Traceback" in err
    # the whole job (rank 0 was blocked in a collective) ended soon after the failure, not at a timeout
    assert ended - float(stamp.read_text()) < 30


# -- MPI -----------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("extra", [(), ("--compress", "fp16"), ("--compress", "powersgd")])
def test_mpi_ranks_hold_identical_parameters_after_every_step(mpi_ok, hooks, tmp_path, extra):
    """Compressed payloads too (issue 19): each rank rounds its own gradient, the exchange makes them agree."""
    check_checksums(tmp_path, hooks, "mpi", extra)


@pytest.mark.timeout(90)
def test_mpi_rank_that_raises_in_training_ends_the_job(mpi_ok, hooks, tmp_path, capfd):
    check_failure(tmp_path, hooks, capfd, "mpi")


# -- Ray (one session for the module, started after the probe is on PYTHONPATH so its workers inherit it) ---------
@pytest.fixture(scope="module")
def ray_session(hooks):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()  # a session started elsewhere has workers without the probe
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("extra", [(), ("--compress", "bf16")])
def test_ray_ranks_hold_identical_parameters_after_every_step(ray_session, hooks, tmp_path, extra):
    check_checksums(tmp_path, hooks, "ray", extra)


@pytest.mark.timeout(90)
def test_ray_rank_that_raises_in_training_ends_the_job(ray_session, hooks, tmp_path, capfd):
    check_failure(tmp_path, hooks, capfd, "ray")
