"""Test-wide setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the fixtures dir.

Tests marked `alone` (the multi-host ones: two processes that wait on each other in collectives and barriers,
which starve on a 2-core machine while the other xdist worker compiles) run with no other test beside them: every
test holds a shared lock, an `alone` test an exclusive one, and a turnstile keeps new tests from starving it.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from binaries import FAST_COMPILE

# Must happen before jax is imported anywhere: multi-device code is tested on fake CPU devices, compiled with
# XLA:CPU's cheap LLVM pipeline (binaries.FAST_COMPILE; the tools the tests start get it too).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The controller makes the lock dir before the workers start (they inherit the variable); a run without xdist too.
if "AHA_TEST_LOCKS" not in os.environ:
    os.environ["AHA_TEST_LOCKS"] = tempfile.mkdtemp(prefix="aha-test-locks-")
    os.environ["AHA_TEST_LOCKS_OWNER"] = str(os.getpid())

import jax  # noqa: E402
import pytest  # noqa: E402

# Golden comparisons need true float32 matmuls (TPU/GPU default to reduced precision).
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def pytest_configure(config):
    config.addinivalue_line("markers", "alone: runs with no other test beside it (tests/conftest.py)")


@pytest.fixture(autouse=True)
def _alone_or_together(request):
    """A shared lock for every test, an exclusive one for tests marked `alone` (taken through a turnstile)."""
    locks = os.environ.get("AHA_TEST_LOCKS")
    if not locks or not Path(locks).is_dir():
        yield
        return
    alone = request.node.get_closest_marker("alone") is not None
    with open(Path(locks) / "turnstile", "a") as turnstile, open(Path(locks) / "room", "a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)  # through the turnstile: an `alone` test waiting keeps it shut
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def pytest_unconfigure(config):
    if os.environ.get("AHA_TEST_LOCKS_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["AHA_TEST_LOCKS"], ignore_errors=True)
