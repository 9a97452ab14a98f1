"""Multi-host bin/train, as several local processes: jax.distributed over localhost, 4 fake CPU devices each.

Reference: one process with 8 fake devices and the same mesh (data=2, fsdp=4) and flags. The two-process run,
with one process killed mid-run and both restarted from the checkpoint they wrote together, must log the same
metrics (1e-6; timings and memory excluded) and export the same params (1e-6, in practice bitwise). An eval set
of 3 puzzles (not a multiple of 2 processes) is evaluated once each: no row duplicated or dropped. Processes
given different flags stop with one line naming the flag.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from binaries import FAST_COMPILE, ROOT
from test_kill_resume import STEPS, _assert_same_run, _command
from tiny_model import make_tiny_model_dir

pytestmark = pytest.mark.alone  # two processes that wait on each other: no other test beside them


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _env(devices: int, cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(tiny: Path, out: Path, *extra: str) -> list[str]:
    return _command(tiny, out, "--mesh=data=2,fsdp=4", "--num_generations=4", "--eval_size=3", *extra)


def _start_pair(tiny: Path, out: Path | str, cache: Path, extra=((), ()), envs=({}, {})) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(_cmd(tiny, out, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                  f"--process_id={i}", *extra[i]),
                             cwd=ROOT, env={**_env(4, cache), **envs[i]}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs, timeout=900) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process. Kept apart: the CPU collectives (Gloo) log on stdout, and a
    merged pipe can splice their lines into ours."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory) -> Path:
    """The reference: one process, 8 devices, the same mesh."""
    work = tmp_path_factory.mktemp("single")
    result = subprocess.run(_cmd(tiny_dir, work / "run"), cwd=ROOT, env=_env(8, work / "cache"), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work / "run"


def test_two_processes_equal_one_also_when_one_is_killed_and_both_restart(tiny_dir, single, tmp_path):
    """The pair runs until step 3 is logged; one process is SIGKILLed (its peer is stuck in a collective or errors
    out), then the other, as a scheduler restarts the whole job; the same command restarts both. Every step and
    eval in the result was computed by the pair (the step-0 eval and steps 1-2 before the kill, step 3 on from
    the checkpoint of step 2), so equality with the single process is also the uninterrupted pair's check."""
    out, cache = tmp_path / "pair", tmp_path / "cache"
    procs = _start_pair(tiny_dir, out, cache)
    deadline = time.monotonic() + 900
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"the pair did not reach step 3: {[(code, e[-3000:]) for code, _, e in _finish(procs)]}")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # one host dies; its peer is stuck in a collective or errors out
    time.sleep(2)
    procs[0].kill()  # as a notebook or a scheduler restarts the whole job
    _finish(procs)
    assert len((out / "metrics.jsonl").read_text().splitlines()) < STEPS
    # A fresh compilation cache for the restart: a pair loading the programs the first pair cached can hang in
    # setup (BUILD.md "Tests").
    for code, stdout, stderr in _finish(_start_pair(tiny_dir, out, tmp_path / "restart_cache")):
        assert code == 0, (stdout + stderr)[-3000:]
    _assert_same_run(out, single)
    eval_rows = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["group"]) for r in eval_rows) == [(s, g) for s in (0, 3, 6) for g in range(3)]


def test_processes_that_disagree_on_flags_stop_with_one_line(tiny_dir, tmp_path):
    results = _finish(_start_pair(tiny_dir, tmp_path / "pair", tmp_path / "cache",
                                  extra=(("--learning_rate=1e-5",), ("--learning_rate=3e-5",))))
    for code, stdout, stderr in results:
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --learning_rate:"), stderr[-2000:]
        assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "pair").exists()


def test_a_setup_error_on_one_host_stops_every_process_at_once(tiny_dir, tmp_path):
    """Hosts have their own files: here `~` differs, and process 1's home is a file, so only it cannot write
    --output_dir. Both stop within seconds with its one line (exit 2), instead of process 0 waiting in its first
    collective until the distributed service's shutdown barrier times out (minutes)."""
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("a file where a directory is expected\n")
    procs = _start_pair(tiny_dir, "~/pair", tmp_path / "cache",
                        envs=({"HOME": str(tmp_path / "home")}, {"HOME": str(not_a_dir)}))
    try:
        results = _finish(procs, timeout=120)
    finally:
        for p in procs:
            p.kill()
    for code, stdout, stderr in results:
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr[-2000:]
        assert lines[0].startswith(f"error: --output_dir: cannot write into {not_a_dir}/pair"), lines
        assert "Traceback" not in stdout + stderr


def test_params_sharded_across_processes_export_whole(tiny_dir, tmp_path):
    """fsdp over both processes' devices (the default multi-host mesh): each tensor's shards span the processes,
    which process 0 alone could not fetch (final_hf/ failed, `Fetching value for jax.Array that spans
    non-addressable devices`). The pair's export equals one process's with the same 4-device mesh (1e-6)."""
    import model

    extra = ("--mesh=data=1,fsdp=4", "--num_generations=4", "--eval_size=3", "--steps=2")
    single = tmp_path / "single"
    result = subprocess.run(_command(tiny_dir, single, *extra), cwd=ROOT, env=_env(4, tmp_path / "cache1"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    port, pair = _free_port(), tmp_path / "pair"
    procs = [subprocess.Popen(_command(tiny_dir, pair, *extra, f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                              cwd=ROOT, env=_env(2, tmp_path / "cache2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for code, stdout, stderr in _finish(procs):
        assert code == 0, (stdout + stderr)[-3000:]
    for name in ("final_hf", "best_hf"):
        _, want = model.load_hf_checkpoint(single / name)
        _, got = model.load_hf_checkpoint(pair / name)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert float(abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-6, name
