"""Where a compiled program spends its time: jax.profiler traces summed per HLO op, named by source scope
(bin/bench_train, bin/bench_sample and `python -m bin.profile_ops TRACE_DIR` print these summaries).

`jax.profiler.start_trace(dir, create_perfetto_trace=True)` writes `perfetto_trace.json.gz`; on XLA:CPU every
executed thunk is one complete ("X") event whose `args.hlo_op` names the HLO instruction (a fusion, a dot, a
while loop). `top_ops` sums the durations per instruction, and `scope_names` maps each instruction to the
`op_name` metadata of the compiled module's HLO text (the jax.named_scope path plus the primitive, e.g.
`jit(step)/.../layers/attention/dot_general`), so a hot op reads as the code that made it. Durations inside
while/scan bodies are counted once per iteration. Thunks run on a pool of threads, so the total can exceed
the wall time; the share column is each op's part of the summed thunk time.
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


def trace_file(trace_dir: str | Path) -> Path:
    """The newest perfetto_trace.json.gz under trace_dir (jax.profiler nests it under plugins/profile/<time>/)."""
    found = sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    return found[-1]


def top_ops(trace_dir: str | Path) -> dict[str, float]:
    """Seconds per HLO instruction name, summed over the trace, largest first."""
    data = json.load(gzip.open(trace_file(trace_dir)))
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and op and not _NOT_OPS.match(e.get("name", "")) and not _CONTAINERS.match(op):
            total[op] += e.get("dur", 0.0) * 1e-6
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
