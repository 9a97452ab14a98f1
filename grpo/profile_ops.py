"""Where a compiled program spends its time: jax.profiler traces summed per HLO op, named by source scope
(bin/bench_train, bin/bench_sample and `bin/profile_ops TRACE_DIR` print these summaries).

`jax.profiler.start_trace(dir)` writes `plugins/profile/<time>/<host>.trace.json.gz` under dir (bin/train's
--profile_steps, into <output_dir>/profile), and with `create_perfetto_trace=True` (the benchmarks) also
`perfetto_trace.json.gz` beside it: the same events, either is read. On XLA:CPU every executed thunk is one
complete ("X") event whose `args.hlo_op` names the HLO instruction (a fusion, a dot, a while loop). `top_ops` sums
the durations per instruction, and `scope_names` maps each instruction to the `op_name` metadata of the compiled
module's HLO text (the jax.named_scope path plus the primitive, e.g. `jit(step)/.../layers/attention/dot_general`),
so a hot op reads as the code that made it. Durations inside while/scan bodies are counted once per iteration.
Thunks run on a pool of threads, so the total can exceed the wall time; the share column is each op's part of the
summed thunk time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

# Executor bookkeeping events, not HLO instructions.
_NOT_OPS = re.compile(r"^(end: |ThunkExecutor|Threadpool)")
# Control-flow instructions: their events span the ops of their bodies, which are counted themselves.
_CONTAINERS = re.compile(r"^(while|call|conditional)(\.\d+)?$")
# `%name = type op(...), ..., metadata={op_name="..." ...}` in compiled HLO text.
_HLO_LINE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]+)"')


# What a user may point bin/profile_ops at, said when there is nothing to read.
TRACE_DIRS = ("a --profile_dir of bin/bench_train or bin/bench_sample, or a bin/train --output_dir traced with "
              "--profile_steps")


def trace_file(trace_dir: str | Path) -> Path:
    """The newest jax.profiler trace (*trace.json.gz, at any depth) under trace_dir."""
    found = sorted(Path(trace_dir).glob("**/*trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no jax.profiler trace (*trace.json.gz) under {trace_dir}: expected {TRACE_DIRS}")
    return found[-1]


def _events(trace: Path) -> list:
    """The trace's events; ValueError naming the file when it is not a gzipped JSON trace (cut off, or another file)."""
    try:
        with gzip.open(trace, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{trace}: not a readable gzipped JSON trace ({e})") from None
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []


def top_ops(trace_dir: str | Path) -> dict[str, float]:
    """Seconds per HLO instruction name, summed over the newest trace under trace_dir, largest first."""
    return _op_seconds(trace_file(trace_dir))


def _op_seconds(trace: Path, by_program: bool = False) -> dict[str, float]:
    """by_program: keys `<hlo_module>:<op>`, for a trace of many programs (bin/train: prefill, decode, the step),
    whose instruction names repeat from one program to the next (every module has its `fusion.1`)."""
    total: collections.Counter[str] = collections.Counter()
    for e in _events(trace):
        args = e.get("args") or {}
        op = args.get("hlo_op")
        if e.get("ph") == "X" and op and not _NOT_OPS.match(e.get("name", "")) and not _CONTAINERS.match(op):
            total[f"{args.get('hlo_module')}:{op}" if by_program else op] += e.get("dur", 0.0) * 1e-6
    return dict(total.most_common())


def scope_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the named-scope path), from a compiled module's text."""
    names = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            names.setdefault(m.group(1), m.group(2))
    return names


# Where an op's time goes, by the first of these scope words in its op_name (checked in this order).
PARTS = ("fused_unembed", "unembed", "logprobs", "attention", "mlp", "layers", "optimizer", "adam", "clip")


def by_part(seconds: dict[str, float], names: dict[str, str]) -> dict[str, float]:
    """Seconds per part of the model (PARTS; 'backward' marks ops under a transpose), largest first."""
    total: collections.Counter[str] = collections.Counter()
    for op, s in seconds.items():
        scope = names.get(op, "")
        part = next((p for p in PARTS if re.search(rf"(^|[/(]){p}($|[/)])", scope)), "other")
        total[part + (" (backward)" if "transpose(" in scope else "")] += s
    return dict(total.most_common())


def summary(seconds: dict[str, float], names: dict[str, str] | None = None, top: int = 15) -> str:
    """A text table of the `top` ops: seconds, share of all thunk time, instruction, scope path."""
    total = sum(seconds.values()) or 1.0
    lines = [f"{'seconds':>8s} {'share':>6s}  op  (scope)"]
    for op, s in list(seconds.items())[:top]:
        scope = (names or {}).get(op, "")
        where = f"  ({_short(scope)})" if scope else ""
        lines.append(f"{s:8.2f} {s / total:6.1%}  {op}{where}")
    lines.append(f"{total:8.2f} {1:6.0%}  all thunks (control flow excluded)")
    if names:
        lines.append("by part: " + ", ".join(f"{p} {s:.1f} s" for p, s in by_part(seconds, names).items()))
    return "\n".join(lines)


def _short(scope: str) -> str:
    """Drop the jit/transpose wrappers' repetition: keep the last five path components."""
    parts = scope.split("/")
    return "/".join(parts[-5:])


def trace_summary(trace_dir: str | Path, top: int = 25) -> str:
    """bin/profile_ops: the newest trace under trace_dir as `summary`'s table, after a line naming the trace. Its
    ops are named by scope from the nearest step.hlo.txt between the trace and trace_dir (bin/bench_train saves
    one where it traces); without one (bin/train, bin/bench_sample) each op is `<program>:<op>`. ValueError, or
    FileNotFoundError, saying what was expected when trace_dir holds no readable trace."""
    trace_dir = Path(trace_dir)
    if not trace_dir.is_dir():
        raise FileNotFoundError(f"no such directory {trace_dir}: expected {TRACE_DIRS}")
    trace = trace_file(trace_dir)
    hlo = _hlo_file(trace, trace_dir)
    seconds = _op_seconds(trace, by_program=hlo is None)  # with the HLO, the one program it describes is the point
    if not seconds:
        raise ValueError(f"{trace}: no HLO op events (expected XLA thunk events with an hlo_op argument)")
    names = scope_names(hlo.read_text()) if hlo else None
    head = f"trace {trace}, " + (f"scopes from {hlo}" if hlo else "no step.hlo.txt above it: <program>:<op>, no scopes")
    return head + "\n" + summary(seconds, names, top)


def _hlo_file(trace: Path, trace_dir: Path) -> Path | None:
    """The nearest step.hlo.txt from the trace's folder up to trace_dir (bin/bench_train's is in <dir>/<tail>/)."""
    for d in trace.parents:
        if (d / "step.hlo.txt").is_file():
            return d / "step.hlo.txt"
        if d == trace_dir:
            return None
    return None
