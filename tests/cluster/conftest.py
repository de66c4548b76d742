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
