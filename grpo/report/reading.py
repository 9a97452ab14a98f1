"""A run directory's files as plain data: the stored completions as Samples, the per-step rows as dicts.

The readers are tolerant, because a report is built from whatever a run left behind, also while it is still
writing: a missing file, a cut-off last line (a run killed mid-write), a missing key or a value of the wrong
type is skipped and noted, never fatal. Only bin/plot's load_curves reads strictly (see read_jsonl). The
formats are the ones grpo/run_files.py writes, current and old.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

_NUMS_RE = re.compile(r"nums=\(([-\d,\s]*)\)")
_TARGET_RE = re.compile(r"target=(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One stored completion, from either the current or the old (`item` repr) line format."""

    step: int
    group: int
    completion: str
    reward: float | None
    solved: bool
    nums: tuple[int, ...] | None = None
    target: int | None = None
    item: str = ""  # the old format's repr, shown when nums/target cannot be parsed out of it
    format: bool | None = None
    length: int | None = None
    truncated: bool | None = None
    level: str | None = None
    own_text: str | None = None  # the eval's completion without budget forcing's tokens (completion_unforced)

    @property
    def own(self) -> str:
        """The text the model wrote itself: where verification phrases are looked for (a forced " Wait" is one)."""
        return self.completion if self.own_text is None else self.own_text

    @property
    def prompt(self) -> str:
        if self.nums is not None and self.target is not None:
            return f"[{', '.join(map(str, self.nums))}] \u2192 {self.target}"
        return self.item or f"group {self.group}"


@dataclasses.dataclass
class Run:
    """What a run directory holds, per step, plus notes on what was missing or skipped."""

    run_dir: Path
    metrics: list[dict]  # one row per step, sorted by step (a resumed run's later line wins)
    evals: list[dict]
    train_samples: list[Sample]
    eval_samples: list[Sample]
    config: dict | None
    notes: list[str]


def _parse_line(line: str) -> tuple[dict | None, str]:
    """(the line's JSON object, "") or (None, why it is not one)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: a damaged line nested beyond Python's stack
        return None, "not a JSON line"
    return (row, "") if isinstance(row, dict) else (None, f"not a JSON object ({type(row).__name__})")


def read_jsonl(path: Path, notes: list[str], strict: bool = False) -> list[dict]:
    """The JSON objects of a JSON-lines file. Unreadable lines are skipped and noted, because a run killed
    mid-write leaves a cut-off last line and a live run may be writing one right now. strict=True raises
    ValueError at the first one instead, naming file and line: a picture (bin/plot) has no place to list
    what it left out, so a damaged file must not quietly become a figure with missing points. A cut-off last
    line (no newline after it) is not damage even then: it is the step being written, or the one a killed run's
    resume drops, and the steps before it are whole."""
    if not path.is_file():
        notes.append(f"{path.name}: not found")
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row, why = _parse_line(line)
        if row is not None:
            rows.append(row)
        elif strict and not (i == len(lines) and not text.endswith("\n")):
            raise ValueError(f"{path}:{i}: {why}")
        else:
            bad.append(i)
    if bad:
        cut = bad[-1] == len(lines) and not text.endswith("\n")
        why = " (the last line is cut off: a run killed mid-write, or still writing)" if cut else ""
        notes.append(f"{path.name}: skipped unreadable line{'s' * (len(bad) > 1)} {format_steps(bad)}{why}")
    return rows


def _int(x) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def number(x) -> float | None:
    """x as a finite float, else None (missing keys, JSON null, strings, NaN all read as 'not recorded')."""
    if isinstance(x, bool):
        return float(x)
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def by_step(rows: list[dict], name: str, notes: list[str]) -> list[dict]:
    """Rows keyed by their step, sorted. A resumed run re-writes the steps after its last checkpoint: the later
    line wins. A row without a step follows the previous one."""
    out: dict[int, dict] = {}
    repeated = []
    step = 0
    for row in rows:
        step = _int(row.get("step")) if _int(row.get("step")) is not None else step + 1
        if step in out:
            repeated.append(step)
        out[step] = {**row, "step": step}
    if repeated:
        notes.append(f"{name}: step{'s' * (len(repeated) > 1)} {format_steps(repeated)} written more than once "
                     "(a resumed run); the later lines are shown")
    return [out[s] for s in sorted(out)]


def parse_sample(row: dict) -> Sample | None:
    """A stored completion in either format; None without a step. Old lines have `item` (a Puzzle repr) and no
    solved flag: nums/target come out of the repr, and reward 1.0 counts as solved."""
    step = _int(row.get("step"))
    if step is None:
        return None
    item = str(row.get("item", ""))
    nums = row.get("nums")
    nums = tuple(nums) if isinstance(nums, list) and all(_int(n) is not None for n in nums) else None
    target = _int(row.get("target"))
    if nums is None and (m := _NUMS_RE.search(item)):
        nums = tuple(int(n) for n in m.group(1).replace(" ", "").split(",") if n)
    if target is None and (m := _TARGET_RE.search(item)):
        target = int(m.group(1))
    reward = number(row.get("reward"))
    solved = row["solved"] if isinstance(row.get("solved"), bool) else reward == 1.0
    group = _int(row.get("group"))
    flag = lambda k: row[k] if isinstance(row.get(k), bool) else None
    return Sample(step=step, group=-1 if group is None else group, completion=str(row.get("completion", "")),
                  reward=reward, solved=solved, nums=nums, target=target, item=item, format=flag("format"),
                  length=_int(row.get("length")), truncated=flag("truncated"),
                  level=row["level"] if isinstance(row.get("level"), str) else None,
                  own_text=row["completion_unforced"] if isinstance(row.get("completion_unforced"), str) else None)


def read_samples(path: Path, notes: list[str]) -> list[Sample]:
    """A samples file as Samples. Old lines have no group: consecutive lines of one step with the same puzzle
    are one group."""
    samples, groups = [], {}
    for row in read_jsonl(path, notes):
        s = parse_sample(row)
        if s is None:
            continue
        if s.group < 0:
            per_step = groups.setdefault(s.step, {})
            s = dataclasses.replace(s, group=per_step.setdefault(s.item, len(per_step)))
        samples.append(s)
    return samples


RUN_CONFIG = "run_config.json"  # what grpo/run_files.py writes at the start of a run


def load_run(run_dir: Path) -> Run:
    """Everything bin/report shows, read from run_dir (which must exist)."""
    notes: list[str] = []
    metrics = by_step(read_jsonl(run_dir / "metrics.jsonl", notes), "metrics.jsonl", notes)
    evals = by_step(read_jsonl(run_dir / "eval.jsonl", notes), "eval.jsonl", notes)
    train = read_samples(run_dir / "train_samples.jsonl", notes)
    evs = read_samples(run_dir / "eval_samples.jsonl", notes)
    config = None
    if (run_dir / RUN_CONFIG).is_file():
        try:
            config = json.loads((run_dir / RUN_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            notes.append(f"{RUN_CONFIG}: not readable JSON, left out")
    return Run(run_dir, metrics, evals, train, evs, config if isinstance(config, dict) else None, notes)


def load_curves(run_dir: Path) -> Run:
    """What bin/plot draws from: metrics.jsonl and eval.jsonl only, read strictly (see read_jsonl)."""
    notes: list[str] = []
    metrics = by_step(read_jsonl(run_dir / "metrics.jsonl", notes, strict=True), "metrics.jsonl", notes)
    evals = by_step(read_jsonl(run_dir / "eval.jsonl", notes, strict=True), "eval.jsonl", notes)
    return Run(run_dir, metrics, evals, [], [], None, notes)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, only where it was recorded as a finite number."""
    pts = [(r["step"], v) for r in rows if (v := number(r.get(key))) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def format_steps(steps) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10': short enough to read in a warning."""
    steps = sorted(set(steps))
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}\u2013{b}" for a, b in runs)
