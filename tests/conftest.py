import os

# One BLAS thread per test process: tests must not depend on (or fight over) the machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Runs made by tests skip the end-of-run HTML report (~3.5 s each) and TensorBoard events unless a test asks for
# them (tests of those features delete these variables with monkeypatch).
os.environ.setdefault("NDTRAIN_REPORT", "0")
os.environ.setdefault("NDTRAIN_TENSORBOARD", "0")

# Shared helpers (tests/helpers/) import as `helpers.*` from any test folder.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mpi_ok():
    """Skip a test that launches MPI ranks where mpi4py or an mpiexec is missing."""
    pytest.importorskip("mpi4py")
    from ndtrain.launch.launch_mpi import find_mpiexec
    try:
        find_mpiexec()
    except FileNotFoundError:
        pytest.skip("no mpiexec")


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray runtime for one test module (start-up costs seconds); shut down after it if it started it."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
