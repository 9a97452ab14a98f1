"""Test-wide setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the fixtures dir."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: multi-device code is tested on fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Golden comparisons need true float32 matmuls (TPU/GPU default to reduced precision).
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
