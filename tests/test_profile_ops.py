"""bin/profile_ops: a jax.profiler trace summed per HLO op, from the layouts the tools write, and its errors.

Reference: real traces of small jitted functions, written here as the tools write them. bin/train's Profiler
calls `jax.profiler.start_trace(<output_dir>/profile)` (only `<host>.trace.json.gz`) around several programs; the
benchmarks trace into `<profile_dir>/<tail>` with `create_perfetto_trace=True` and save the compiled HLO there as
step.hlo.txt. The check is exact: the tool lists every op the raw trace events name, by name. Bad input is one
line `error: --trace_dir: ...` and exit status 2, as for every bin/ tool.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from binaries import run_tool

from grpo.profile_ops import TRACE_DIRS, trace_summary


def _probe(x):
    with jax.named_scope("probe"):
        return jnp.tanh(x @ x).sum()


def _other(x):
    return jnp.cos(x @ x).sum()


def _traced(trace_dir: Path, perfetto: bool, *fns) -> str:
    """One call of each jitted function, traced into trace_dir; the first one's compiled HLO text."""
    x = jnp.ones((32, 32))
    compiled = [jax.jit(f).lower(x).compile() for f in fns]
    for c in compiled:
        c(x).block_until_ready()  # the first call's one-time work stays out of the trace
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=perfetto)
    for c in compiled:
        c(x).block_until_ready()
    jax.profiler.stop_trace()
    return compiled[0].as_text()


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("traces")
    run, bench = root / "run", root / "prof"
    _traced(run / "profile", False, _probe, _other)  # bin/train --profile_steps A,B: several programs
    (bench / "completion").mkdir(parents=True)
    (bench / "completion" / "step.hlo.txt").write_text(_traced(bench / "completion", True, _probe))
    return {"run": run, "bench": bench}


def _programs_ops(trace: Path) -> set[str]:
    """`<hlo_module>:<hlo_op>` of every complete event that names an HLO op (the probes have no loops)."""
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return {f"{e['args']['hlo_module']}:{e['args']['hlo_op']}" for e in events
            if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})}


def test_reads_bin_train_layout(traces):
    """A bin/train --output_dir (its profile/ holds no perfetto file, no step.hlo.txt): every op of every program,
    the programs kept apart (their instruction names repeat)."""
    res = run_tool("profile_ops", str(traces["run"]))
    assert res.returncode == 0, res.stderr
    head, _, *rows = res.stdout.strip().splitlines()
    trace = Path(head.split()[1].rstrip(","))
    assert trace.parent.parent == traces["run"] / "profile" / "plugins" / "profile" and trace.name.endswith(
        ".trace.json.gz"), head
    assert head.endswith(", no step.hlo.txt above it: <program>:<op>, no scopes"), head
    want = _programs_ops(trace)
    assert {m.split(":")[0] for m in want} == {"jit__probe", "jit__other"}
    assert {row.split()[2] for row in rows[:-1]} == want


def test_bench_layout_through_the_launcher_and_the_flag(traces):
    """The benchmark's --profile_dir above its <tail>/: the step.hlo.txt beside the trace names the scopes."""
    res = run_tool("profile_ops", "--trace_dir", str(traces["bench"]), launcher=True)
    assert res.returncode == 0, res.stderr
    head = res.stdout.splitlines()[0]
    assert head.endswith(f", scopes from {traces['bench'] / 'completion' / 'step.hlo.txt'}"), head
    assert "probe" in res.stdout  # the named scope, from the HLO's op_name metadata
    assert trace_summary(traces["bench"]) == res.stdout.strip()


def test_help_lists_the_flag():
    """--help is absl's, as for every bin/ tool (its exit status is absl's 1), not a directory's name."""
    res = run_tool("profile_ops", "--help")
    assert not res.stderr, res.stderr
    assert "--trace_dir" in res.stdout and "bin/profile_ops runs/prof/completion" in res.stdout


def test_errors_are_one_line_naming_the_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad" / "host.trace.json.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(b'{"traceEvents": [')[:-4])  # cut off, as by a killed run
    cases = [([str(tmp_path / "nope")], f"no such directory {tmp_path / 'nope'}: expected {TRACE_DIRS}"),
             ([str(tmp_path / "empty")],
              f"no jax.profiler trace (*trace.json.gz) under {tmp_path / 'empty'}: expected {TRACE_DIRS}"),
             ([], "expected one directory (the flag or one argument), got none"),
             (["a", "b"], "expected one directory (the flag or one argument), got ['a', 'b']"),
             ([f"--trace_dir={tmp_path}", "b"],
              f"expected one directory (the flag or one argument), got ['{tmp_path}', 'b']")]
    for args, message in cases:
        res = run_tool("profile_ops", *args)
        assert (res.returncode, res.stderr.strip()) == (2, f"error: --trace_dir: {message}"), args
    res = run_tool("profile_ops", str(tmp_path / "bad"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: --trace_dir: {bad}: not a readable gzipped JSON trace"), res.stderr
