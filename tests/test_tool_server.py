"""The tests' tool server (tests/binaries.py `forked_tool`) against a new interpreter: a tool forked from the
server exits, prints and writes as `python -m bin.<name>` does, so the tests that run tools through it check
what users run. Reference: the same command in a new interpreter (`run_tool(..., fork=False)`), compared whole."""

import os
import subprocess

import binaries
import pytest
from binaries import run_tool


@pytest.mark.parametrize("args", [
    ("report", "--run_dir", "/nonexistent"),  # a FlagError: one line, exit 2
    ("bench_puzzles", "--no_such_flag"),  # absl's own parsing error
    ("make_dataset", "--help"),  # absl's help: stdout, exit 1
])
def test_a_forked_tool_equals_a_new_interpreter(args):
    forked, fresh = run_tool(*args), run_tool(*args, fork=False)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_tool_past_its_timeout_is_killed_and_the_server_serves_on(tmp_path):
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)  # opening it for reading waits for a writer that never comes
    with pytest.raises(subprocess.TimeoutExpired):
        run_tool("sample", f"--prompts_file={fifo}", timeout=3)
    assert run_tool("report", "--run_dir", "/nonexistent").returncode == 2


def test_two_replies_in_the_pipe_at_once_are_both_read(monkeypatch):
    """A fast tool's {"pid"} and {"status"} lines can reach the pipe together; each is read the moment it is
    there (a buffered readline took both and the second wait ran to its timeout)."""
    fake = subprocess.Popen(["sh", "-c", 'printf \'{"pid": 7}\\n{"status": 2}\\n\'; sleep 30'],
                            stdout=subprocess.PIPE, text=True)
    try:
        monkeypatch.setattr(binaries, "_unread", b"")
        assert binaries._reply(fake, timeout=10) == {"pid": 7}
        assert binaries._reply(fake, timeout=2) == {"status": 2}
    finally:
        fake.kill()
        fake.wait()
        fake.stdout.close()
