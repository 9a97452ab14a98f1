"""What the report says about a run: the warnings (each naming its steps), the aha evidence, the best eval.

Pure functions over reading.py's rows and Samples; nothing here reads files, draws or writes HTML. The
thresholds are named below; a symptom must last STUCK_STEPS steps in a row before it warns, so one odd step
of a healthy run does not.
"""

from __future__ import annotations

import dataclasses

from data.templates import NO_ANSWER, NOT_ARITHMETIC, REST
from grpo.best_model import better, eval_score
from grpo.entropy_control import ENTROPY_BAND
from grpo.guard import GuardConfig
from grpo.report.reading import Run, Sample, format_steps, number, series
from grpo.rollout import has_aha

# Warning thresholds. A run is "stuck" after this many consecutive steps of the same symptom.
STUCK_STEPS = 5
COLLAPSE_RATIO = 0.25  # mean completion length below this share of its early value
EARLY_STEPS = 5  # steps whose mean length is "early"
PINNED_TRUNCATED = 0.95  # truncated_frac at least this: every completion hits the budget
REPEAT_LINES = 3  # identical consecutive non-empty lines that make a completion repetitive
REPEAT_SHARE = 0.5  # share of a step's completions that are repetitive before it is a warning
DOMINANT_TEMPLATE = 0.8  # one answer template's share of a step's completions that means "one answer for all"
SPECIAL_TEMPLATES = (NO_ANSWER, NOT_ARITHMETIC, REST)  # answer_templates keys that are not an answer's shape


@dataclasses.dataclass(frozen=True)
class Warn:
    """Something that went wrong in the run, and the steps where it shows."""

    title: str
    detail: str
    steps: tuple[int, ...]


def is_repetitive(text: str, run: int = REPEAT_LINES) -> bool:
    """True when the same non-empty line appears `run` times in a row: a model stuck in a loop."""
    count, prev = 0, None
    for line in (ln.strip() for ln in text.splitlines()):
        if not line:
            continue
        count = count + 1 if line == prev else 1
        prev = line
        if count >= run:
            return True
    return False


def stuck_runs(flags_by_step: dict[int, bool], min_len: int = STUCK_STEPS) -> list[int]:
    """The steps inside runs of at least min_len consecutive recorded steps where the flag holds."""
    out, current = [], []
    for step in sorted(flags_by_step):
        if flags_by_step[step] and (not current or step == current[-1] + 1):
            current.append(step)
        else:
            out += current if len(current) >= min_len else []
            current = [step] if flags_by_step[step] else []
    return out + (current if len(current) >= min_len else [])


def by_step_samples(samples: list[Sample]) -> dict[int, list[Sample]]:
    out: dict[int, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.step, []).append(s)
    return out


def groups_of(samples: list[Sample]) -> list[list[Sample]]:
    """One step's samples as prompt groups: level by level (as stored), in group order within a level. The eval
    numbers its groups per level (each level's held-out puzzles from 0), so the group alone mixes puzzles."""
    out: dict[tuple[str | None, int], list[Sample]] = {}
    for s in samples:
        out.setdefault((s.level, s.group), []).append(s)
    levels = list(dict.fromkeys(level for level, _ in out))
    return [out[k] for k in sorted(out, key=lambda k: (levels.index(k[0]), k[1]))]


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def aha_shares(metrics: list[dict], samples: list[Sample]) -> list[tuple[int, float | None, float | None, str]]:
    """Per step: (step, share of solved completions with a phrase, share of unsolved ones, source). The metrics'
    aha_frac_solved / aha_frac_unsolved count every completion; stored samples are the fallback."""
    out = {}
    for step, rows in by_step_samples(samples).items():
        out[step] = (step, _share([has_aha(s.own) for s in rows if s.solved]),
                     _share([has_aha(s.own) for s in rows if not s.solved]), "samples")
    for m in metrics:
        a, b = number(m.get("aha_frac_solved")), number(m.get("aha_frac_unsolved"))
        if a is not None or b is not None:
            out[m["step"]] = (m["step"], a, b, "metrics")
    return [out[s] for s in sorted(out)]


def first_aha(samples: list[Sample]) -> Sample | None:
    """The earliest solved completion that contains a verification phrase: the 'aha' to look at first."""
    return min((s for s in samples if s.solved and has_aha(s.own)), key=lambda s: (s.step, s.group),
               default=None)


def pick_steps(steps, k: int = 6) -> list[int]:
    """k steps to browse: the first, the last, and evenly spaced ones between."""
    steps = sorted(set(steps))
    if len(steps) <= k:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def _flag(rows: list[dict], test) -> dict[int, bool]:
    """{step: test(row)} over the rows where test can tell (it returns None when its keys are missing)."""
    return {r["step"]: bool(t) for r in rows if (t := test(r)) is not None}


def _all_truncated(row: dict) -> bool | None:
    v = number(row.get("truncated_frac"))
    return None if v is None else v >= PINNED_TRUNCATED


def _mean_is_max(row: dict) -> bool | None:
    mean, top = number(row.get("completion_len_mean")), number(row.get("completion_len_max"))
    return None if mean is None or top is None else top > 0 and mean == top


def _rewards_equal(row: dict) -> bool | None:
    zero = number(row.get("frac_zero_std_groups"))
    if zero is not None:
        return zero == 1.0
    std = number(row.get("reward_std"))
    return None if std is None else std == 0.0


def _collapse(m: list[dict]) -> list[Warn]:
    steps, lens = series(m, "completion_len_mean")
    n = min(EARLY_STEPS, len(lens))
    if len(lens) <= n or (base := sum(lens[:n]) / n) < 4:
        return []
    low = [s for s, v in zip(steps[n:], lens[n:], strict=True) if v < COLLAPSE_RATIO * base]
    return [Warn("Completion length collapsed", f"mean completion length fell below {COLLAPSE_RATIO:.0%} of its "
                 f"early value ({base:.0f} tokens over steps {format_steps(steps[:n])})", tuple(low))] if low else []


def _pinned(m: list[dict]) -> list[Warn]:
    trunc, equal = stuck_runs(_flag(m, _all_truncated)), stuck_runs(_flag(m, _mean_is_max))
    why = [w for w, hit in (("every completion hit the token budget", trunc),
                            ("mean completion length equalled the max", equal)) if hit]
    return [Warn("Completion length pinned at the budget", f"{' and '.join(why)} for {STUCK_STEPS}+ steps in a "
                 "row: answers do not end", tuple(sorted({*trunc, *equal})))] if why else []


def _repetition(samples: list[Sample]) -> list[Warn]:
    rep = [step for step, rows in by_step_samples(samples).items()
           if _share([is_repetitive(s.completion) for s in rows]) >= REPEAT_SHARE]
    return [Warn("Repetition", f"in {REPEAT_SHARE:.0%} or more of a step's stored completions one line repeats "
                 f"{REPEAT_LINES}+ times in a row", tuple(sorted(rep)))] if rep else []


def _no_signal(m: list[dict], samples: list[Sample]) -> list[Warn]:
    equal = _flag(m, _rewards_equal)
    for step, rows in by_step_samples(samples).items():  # steps whose metrics cannot tell: whole stored groups
        groups = [g for g in groups_of(rows) if len(g) > 1]
        if step not in equal and groups:
            equal[step] = all(len({s.reward for s in g}) == 1 for g in groups)
    zero = stuck_runs(equal)
    return [Warn("No learning signal", f"every group's rewards were equal (zero advantage, nothing to learn) for "
                 f"{STUCK_STEPS}+ steps in a row", tuple(zero))] if zero else []


def entropy_warnings(metrics: list[dict]) -> list[Warn]:
    """Steps whose policy entropy (metrics.jsonl `entropy`, nats per completion token) left
    grpo.entropy_control.ENTROPY_BAND, one warning per side: above it the completions turn to noise, below it the
    answers are near-deterministic (groups stop differing). Any single step counts (no run of STUCK_STEPS: one step
    of noise already damages the policy); steps without a finite entropy do not count."""
    low, high = ENTROPY_BAND
    steps, values = series(metrics, "entropy")
    above = [(s, v) for s, v in zip(steps, values, strict=True) if v > high]
    below = [(s, v) for s, v in zip(steps, values, strict=True) if v < low]
    out = []
    if above:
        out.append(Warn("Entropy out of band", f"policy entropy above the band's top, {high:g} nats/token (peak "
                        f"{max(v for _, v in above):.3g}): noise in the completions", tuple(s for s, _ in above)))
    if below:
        out.append(Warn("Entropy out of band", f"policy entropy below the band's bottom, {low:g} nats/token (lowest "
                        f"{min(v for _, v in below):.3g}): entropy collapse, near-deterministic answers",
                        tuple(s for s, _ in below)))
    return out


def dominant_template(row: dict) -> str | None:
    """The answer template holding at least DOMINANT_TEMPLATE of a step's completions, if any."""
    shares = row.get("answer_templates")
    if not isinstance(shares, dict):
        return None
    top = [t for t, v in shares.items() if t not in SPECIAL_TEMPLATES and (number(v) or 0) >= DOMINANT_TEMPLATE]
    return top[0] if top else None


def _one_template(m: list[dict]) -> list[Warn]:
    by_template: dict[str, dict[int, bool]] = {}
    for row in m:
        if isinstance(row.get("answer_templates"), dict):
            t = dominant_template(row)
            for name in {*by_template, *([t] if t else [])}:
                by_template.setdefault(name, {})[row["step"]] = name == t
    return [Warn("Answer template dominates", f"one answer shape, {t!r}, made {DOMINANT_TEMPLATE:.0%}+ of the "
                 f"completions for {STUCK_STEPS}+ steps in a row: an answer that does not read the target",
                 tuple(steps)) for t, flags in by_template.items() if (steps := stuck_runs(flags))]


def template_table(m: list[dict], steps: list[int], top: int = 3) -> list[tuple[int, list[tuple[str, float]]]]:
    """(step, [(template, share)] of its `top` largest) for the given steps that recorded answer_templates."""
    rows = {r["step"]: r["answer_templates"] for r in m if isinstance(r.get("answer_templates"), dict)}
    out = []
    for s in (s for s in steps if s in rows):
        shares = [(str(t), x) for t, v in rows[s].items() if (x := number(v)) is not None]
        out.append((s, sorted(shares, key=lambda tv: -tv[1])[:top]))
    return out


def best_eval(evals: list[dict]) -> dict | None:
    """The eval row the run keeps as its best (grpo/best_model.py: the first strictly better score wins)."""
    best = None
    for row in evals:
        try:
            if better(eval_score(row)[0], None if best is None else eval_score(best)[0]):
                best = row
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):  # an eval line without its rates
            continue
    return best


def _eval_means(row: dict) -> tuple[float | None, float | None]:
    """(mean format, mean solved) over an eval's levels, as the guard reads them."""
    fmt, solved = row.get("format_by_level"), row.get("solved_by_level")
    f = [number(v) for v in fmt.values()] if isinstance(fmt, dict) else [number(row.get("eval_format_frac"))]
    s = [number(v) for v in solved.values()] if isinstance(solved, dict) else [number(row.get("eval_solved_frac"))]
    mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None
    return mean(f), mean(s)


GUARD = GuardConfig()  # the guard's default drops: what the report calls a fall


def eval_drop_warnings(evals: list[dict], cfg: GuardConfig = GUARD) -> list[Warn]:
    """Evals whose held-out format or solved rate (means over the levels) fell further below their best so far
    than the guard allows (grpo/guard.py's format_drop / score_drop)."""
    out = []
    for i, (name, drop, what) in enumerate((("format", cfg.format_drop, "Eval format collapsed"),
                                            ("solved", cfg.score_drop, "Held-out score fell"))):
        best, low = None, []
        for row in evals:
            v = _eval_means(row)[i]
            if v is None:
                continue
            if best is not None and v < best - drop:
                low.append(row["step"])
            best = v if best is None else max(best, v)
        if low:
            out.append(Warn(what, f"the held-out {name} rate (mean over the levels) fell more than {drop:g} below "
                            f"its best", tuple(low)))
    return out


def warnings(run: Run) -> list[Warn]:
    """Every symptom of a run going wrong that its files show, each naming its steps."""
    skipped = [r["step"] for r in run.metrics if number(r.get("skipped"))]
    return [*_collapse(run.metrics), *_pinned(run.metrics), *_repetition(run.train_samples),
            *_no_signal(run.metrics, run.train_samples), *entropy_warnings(run.metrics),
            *eval_drop_warnings(run.evals),
            *_one_template(run.metrics),
            *([Warn("Skipped steps", "non-finite loss or gradients: the update was skipped", tuple(skipped))]
              if skipped else [])]



AHA_RISE = 0.05  # a share of held-out completions with a phrase this far above the base model's counts as a rise
AHA_FEW = 3  # fewer completions with a phrase than this say nothing about whether it goes with solving


def aha_by_level_rows(evals: list[dict]) -> list[tuple[int, dict]]:
    """(step, aha_by_level) of every eval that recorded it, in step order; a level's entry that is not an object
    (a hand-edited or foreign file) is left out."""
    return [(e["step"], {k: v for k, v in e["aha_by_level"].items() if isinstance(v, dict)})
            for e in evals if isinstance(e.get("aha_by_level"), dict)]


def aha_verdict(evals: list[dict]) -> list[str]:
    """Plain sentences per level: did self-verification on the held-out set rise beyond the first eval's (the base
    model's, at step 0), and does it go with solving (OAT-Zero's superficial self-reflection: a phrase, a wrong
    answer)? Each level is read at its latest eval with a number; a run without a step-0 record, or with no later
    eval yet, gets one sentence saying so. Empty when no eval recorded aha_by_level."""
    rows = aha_by_level_rows(evals)
    if not rows:
        return []
    if rows[0][0] != 0:
        return [f"No step-0 eval recorded aha_by_level (the first is at step {rows[0][0]}): there is no base-model "
                "baseline to compare with."]
    if len(rows) < 2:
        return ["Only the base model's eval (step 0) so far: the comparison comes with the next eval."]
    step0, base = rows[0]
    levels = list(dict.fromkeys(k for _, d in rows[1:] for k in d))
    return [_aha_level_verdict(level, step0, base.get(level), rows[1:]) for level in levels]


def _aha_level_verdict(level: str, step0: int, was: dict | None, later: list[tuple[int, dict]]) -> str:
    b = number((was or {}).get("aha_frac"))
    recorded = [(s, d[level]) for s, d in later if number((d.get(level) or {}).get("aha_frac")) is not None]
    if b is None or not recorded:
        return f"{level}: no step-0 baseline for this level (or no later number), so nothing to compare."
    step, now = recorded[-1]
    n = number(now.get("aha_frac"))
    if n > b + AHA_RISE:
        trend = f"rose from {b:.2f} at step {step0} to {n:.2f} at step {step}"
    elif n < b - AHA_RISE:
        trend = f"fell from {b:.2f} at step {step0} to {n:.2f} at step {step}"
    else:
        trend = f"stayed at the base model's level ({b:.2f} at step {step0}, {n:.2f} at step {step})"
    return f"{level}: the share of held-out completions with a verification phrase {trend}; {_aha_solving(now)}."


def _aha_solving(now: dict) -> str:
    """Does a phrase go with solving, at one eval of one level?"""
    w, wo, n = number(now.get("solved_with_aha")), number(now.get("solved_without_aha")), number(now.get("aha_frac"))
    count, total = number(now.get("num_with_aha")), number(now.get("num_completions"))
    if w is None or not n:
        return "no completion had a phrase, so nothing says whether it helps"
    if count is not None and count < AHA_FEW:
        of = f" of {total:.0f}" if total is not None else ""
        return f"only {count:.0f}{of} completions had a phrase, too few to say whether it goes with solving"
    if wo is None:
        return f"every completion has one ({w:.2f} solved)"
    if w > wo:
        return f"completions with a phrase solve more often ({w:.2f} vs {wo:.2f} without)"
    if w < 0.5:
        return f"superficial: completions with a phrase solve no more often ({w:.2f} vs {wo:.2f} without)"
    return f"completions with a phrase solve no more often than those without ({w:.2f} vs {wo:.2f})"
