"""Test configuration: 8 fake CPU devices (for pmap / sharding tests), set before JAX is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402  (after the XLA flags above)
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_devices(n): needs n JAX devices; skipped (not failed) with fewer, "
                                       "e.g. on one GPU/TPU chip (JAX_PLATFORMS=cuda)")


def pytest_collection_modifyitems(config, items):
    """Skip tests that need more devices than this run has: ``@pytest.mark.requires_devices(n)``, or every test of a
    module that declares ``N_DEV = n`` (the 8 fake CPU devices above exist only on the CPU backend)."""
    have = jax.device_count()
    for item in items:
        marker = item.get_closest_marker("requires_devices")
        need = marker.args[0] if marker else getattr(getattr(item, "module", None), "N_DEV", 1)
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} devices, {jax.default_backend()} has {have} "
                                                    f"(JAX_PLATFORMS=cpu gives 8 fake devices)"))


@pytest.fixture
def x64():
    """float64 enabled for one test, restored afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(scope="module")
def fast_compilation():
    """XLA with most optimizations off compiles ~2x faster on CPU; for modules that check math, not speed
    (``pytestmark = pytest.mark.usefixtures("fast_compilation")``). Restored after the module."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
