"""Test-wide setup: 8 fake CPU devices for the sharding tests, float32 matmuls, the fixtures dir.

Tests marked `alone` (the multi-host ones: two processes that wait on each other in collectives and barriers,
which starve on a 2-core machine while the other xdist worker compiles) run with no other test beside them: every
test (and every module fixture's setup) holds a shared lock, an `alone` test an exclusive one, and a turnstile
keeps new tests from starving it.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from binaries import FAST_COMPILE

# Must happen before jax is imported anywhere: multi-device code is tested on fake CPU devices, compiled with
# XLA:CPU's cheapest code generation (binaries.FAST_COMPILE; the tools the tests start get it too).
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


# xdist hands whole files to the two workers in this order (pyproject.toml: --no-loadscope-reorder): the `alone`
# file first, beside a file of short tests (so it waits little for the room), then the longest files first, so
# that the workers finish together instead of one idling through the last long file (BUILD.md "Tests").
LONGEST_FIRST = ("test_multihost.py", "test_golden.py", "test_kill_resume.py", "test_machines.py",
                 "test_bad_flags.py", "test_lora.py", "test_grpo_step.py", "test_sampler.py", "test_shared_prompt.py",
                 "test_damage.py", "test_bench.py", "test_planner.py", "test_guard.py", "test_train_cli.py",
                 "test_precision.py", "test_inspect.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


_held = 0  # how deep this process is inside the room: a fixture set up during a test already holds it


@contextlib.contextmanager
def _room(alone: bool):
    """The shared lock (exclusive when `alone`), taken through the turnstile: an `alone` test waiting keeps it
    shut to newcomers. Re-entrant within a process."""
    global _held
    locks = os.environ.get("AHA_TEST_LOCKS")
    if _held or not locks or not Path(locks).is_dir():
        yield
        return
    with open(Path(locks) / "turnstile", "a") as turnstile, open(Path(locks) / "room", "a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        _held += 1
        try:
            yield
        finally:
            _held -= 1
            fcntl.flock(room, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _alone_or_together(request):
    """Every test in the room; a test marked `alone` by itself."""
    with _room(request.node.get_closest_marker("alone") is not None):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module and session fixtures (reference runs, tiny models) are set up in the room too: they come before
    a test's own fixtures, and a reference run beside an `alone` multi-host pair starves it."""
    if fixturedef.scope == "function":
        yield
        return
    with _room(False):
        yield


def pytest_unconfigure(config):
    if os.environ.get("AHA_TEST_LOCKS_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["AHA_TEST_LOCKS"], ignore_errors=True)
