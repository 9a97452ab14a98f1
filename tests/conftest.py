"""Test-wide setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the fixtures dir, and one
persistent XLA compilation cache for the whole run.

Most of the suite's time is XLA compiling the same tiny programs again: in every `bin/train` subprocess, and in
every test that builds its own jitted step. A cache shared by the run (both xdist workers and every subprocess,
through JAX_COMPILATION_CACHE_DIR) compiles each program once. It starts empty and is removed at the end, so a
run's timing does not depend on the runs before it.
"""

import os
import shutil
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere: multi-device code is tested on fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The controller makes the cache before the workers start (they inherit the variable); a run without xdist too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aha-test-xla-cache-")
    os.environ["AHA_TEST_CACHE_OWNER"] = str(os.getpid())

import jax  # noqa: E402
import pytest  # noqa: E402

# Golden comparisons need true float32 matmuls (TPU/GPU default to reduced precision).
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def pytest_unconfigure(config):
    if os.environ.get("AHA_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
