import pytest


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
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
