import pytest


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
