"""Test configuration: 8 fake CPU devices (for pmap / sharding tests), set before JAX is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402  (after the XLA flags above)
import pytest  # noqa: E402


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
