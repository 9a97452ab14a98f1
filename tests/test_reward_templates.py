"""No reward for an answer that ignores the target, past each ladder's first rung; and answer templates.

An accelerator run's policy answered every 3-number puzzle `a + b + c` because the exact-numbers rung paid for it
on every puzzle. Here every fixed answer template -- every choice of + - * / between the given numbers in the
given order, with every full bracketing, and the same over every non-empty subset of the numbers kept in order
(one number alone included) -- is scored with each level's real reward (`ladder(name)`, the default shaping) over
500 generated puzzles, for every level of every ladder in data.curriculum.LADDERS but the first (which keeps its
shaping on purpose).

Reference: TinyZero's reward of the same answers (data.countdown.score: 0.1 formatted and wrong, 1.0 right).
Tolerance: each template's mean reward within 0.05 of the reference's mean (the issue's bound). The same check
fails on the legacy shaping's 3x1-30 and on each ladder's first level, so it can fail.

data.templates (the shapes logged as `answer_templates`): hand-worked templates and shares, exact.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from data import countdown
from data.curriculum import LADDERS, ladder, level_splits
from data.puzzles import Puzzle
from data.templates import LETTERS, NO_ANSWER, NOT_ARITHMETIC, REST, answer_template, template_shares

PUZZLES = 500
TOLERANCE = 0.05
SEED = 2026


def _trees(operands: tuple[str, ...]):
    """Every full binary bracketing of the operands (in order) with every operator at each node."""
    if len(operands) == 1:
        yield operands[0]
        return
    for cut in range(1, len(operands)):
        for left in _trees(operands[:cut]):
            for right in _trees(operands[cut:]):
                for op in "+-*/":
                    yield f"({left} {op} {right})"


def templates(count: int) -> list[str]:
    """Format strings over positions {0}..{count-1}: every non-empty subset (in order), every tree of it."""
    out = []
    for size in range(1, count + 1):
        for subset in itertools.combinations(range(count), size):
            out += list(_trees(tuple(f"{{{i}}}" for i in subset)))
    return out


@functools.cache
def _puzzles(ladder_name: str, level_index: int) -> dict[int, tuple[Puzzle, ...]]:
    """The level's first PUZZLES training puzzles (fixed seed), by how many numbers they have."""
    by_count: dict[int, list[Puzzle]] = {}
    for p in level_splits(LADDERS[ladder_name][level_index], PUZZLES, 0, seed=SEED)[0]:
        by_count.setdefault(len(p.nums), []).append(p)
    return {k: tuple(v) for k, v in by_count.items()}


def gaps(ladder_name: str, level_index: int, shaping: str) -> list[tuple[float, str]]:
    """(mean level reward - mean TinyZero reward, template as letters) per template, largest |gap| first."""
    level = ladder(ladder_name, shaping)[level_index]
    out = []
    for count, puzzles in _puzzles(ladder_name, level_index).items():
        for t in templates(count):
            ours, theirs = np.zeros(len(puzzles)), np.zeros(len(puzzles))
            for i, p in enumerate(puzzles):
                text = f"<answer> {t.format(*p.nums)} </answer>"
                ours[i] = level.reward.score(text, p.nums, p.target)[0]
                theirs[i] = countdown.score(text, p.nums, p.target)
            out.append((float(ours.mean() - theirs.mean()), t.format(*LETTERS[:count])))
    return sorted(out, key=lambda g: -abs(g[0]))


def _distinct_cases() -> list[tuple[str, int]]:
    """(ladder, level index) of every level but a ladder's first, each distinct level once (the balanced ladder
    shares its levels from 3x1-30 up with the countdown ladder)."""
    cases, seen = [], set()
    for name, levels in LADDERS.items():
        for i, level in enumerate(levels[1:], start=1):
            if level not in seen:
                seen.add(level)
                cases.append((name, i))
    return cases


CASES = _distinct_cases()


def test_template_counts():
    """Reference: Catalan numbers (1, 1, 2, 5 bracketings of 1..4 numbers) times 4 operators per node."""
    assert len(templates(2)) == 2 + 4
    assert len(templates(3)) == 3 + 3 * 4 + 2 * 16
    assert len(templates(4)) == 4 + 6 * 4 + 4 * 2 * 16 + 5 * 64
    assert len(set(templates(4))) == len(templates(4))
    assert {"{0}", "(({0} + {1}) + {2})", "({0} - ({1} / {2}))"} <= set(templates(3))
    assert {"({1} * {3})", "(({0} - {1}) * ({2} / {3}))"} <= set(templates(4))


def test_every_level_is_generated_in_full():
    for name, i in CASES:
        assert sum(len(ps) for ps in _puzzles(name, i).values()) == PUZZLES


@pytest.mark.parametrize("ladder_name,level_index", CASES, ids=[f"{n}-{LADDERS[n][i].name}" for n, i in CASES])
def test_no_fixed_template_pays_other_than_tinyzero(ladder_name, level_index):
    found = gaps(ladder_name, level_index, "first_rung")
    worst = [f"{t} {g:+.3f}" for g, t in found if abs(g) > TOLERANCE]
    assert not worst, f"{LADDERS[ladder_name][level_index].name}: mean reward minus TinyZero's: {worst[:5]}"


def test_the_check_fails_on_legacy_shaping():
    """Legacy shaping pays the exact-numbers rung (0.25 on 3x1-30) for any arrangement of the given numbers."""
    names = [lv.name for lv in LADDERS["countdown"]]
    found = dict((t, g) for g, t in gaps("countdown", names.index("3x1-30"), "legacy"))
    assert found["((a + b) + c)"] > 0.1  # 0.25 against TinyZero's 0.1 on every puzzle it does not solve
    assert found["a"] == pytest.approx(0.15 - 0.1)  # the partial rung for one given number: on the bound itself
    assert max(found.values()) > TOLERANCE


@pytest.mark.parametrize("ladder_name", sorted(LADDERS))
def test_the_first_rung_is_exempt_by_design(ladder_name):
    """The default shaping keeps the first level's rungs (the same reward as legacy), so the check fails there."""
    assert ladder(ladder_name)[0] == LADDERS[ladder_name][0]
    assert gaps(ladder_name, 0, "first_rung")[0][0] > TOLERANCE


def solve_rates(ladder_name: str, level_index: int) -> dict[str, float]:
    """Template (as letters) -> the share of the level's puzzles it solves."""
    out = {}
    for count, puzzles in _puzzles(ladder_name, level_index).items():
        for t in templates(count):
            hits = [countdown.score(f"<answer> {t.format(*p.nums)} </answer>", p.nums, p.target) == 1.0
                    for p in puzzles]
            out[t.format(*LETTERS[:count])] = float(np.mean(hits))
    return out


@pytest.mark.parametrize("index", [0, 1])
def test_no_fixed_answer_climbs_the_balanced_ladder(index):
    """The balanced ladder's 2-number levels: no fixed answer solves more than 0.3 of the puzzles (each operation
    a quarter; the recipes promote at 0.35), where on the countdown ladder's the sum solves over 0.45."""
    balanced, countdown_rates = solve_rates("balanced", index), solve_rates("countdown", index)
    assert max(balanced.values()) < 0.3, sorted(balanced.items(), key=lambda kv: -kv[1])[:3]
    assert countdown_rates["(a + b)"] > 0.45


@pytest.mark.parametrize("answer,want", [
    ("12+5 + 30", "a + b + c"),  # whitespace normalised
    (" (30 - 5) * 12 ", "(c - b) * a"),  # letters by position in nums, parentheses hug
    ("5 * 5", "b * #"),  # the second 5 is not a given number
    ("12 + 7", "a + #"),
    ("12.0 + 5", "# + b"),  # a decimal is not a given literal
    ("-5 + ((12))", "-b + ((a))"),  # a sign hugs its operand
    ("30", "c"),
    ("3, 9", NOT_ARITHMETIC),
    ("5 ** 2", NOT_ARITHMETIC),  # countdown.evaluate refuses it, so does the template
    ("", NOT_ARITHMETIC),
])
def test_answer_template(answer, want):
    assert answer_template(f"<think>12 + 5</think>\n<answer>{answer}</answer>", (12, 5, 30)) == want


def test_answer_template_edges():
    assert answer_template("no tags here", (1, 2)) == NO_ANSWER
    assert answer_template("<answer>1 + 2</answer>\nmore text", (1, 2)) == NO_ANSWER  # TinyZero's last line only
    assert answer_template("<answer>5 + 5 * 3</answer>", (5, 3, 5)) == "a + c * b"  # first unused equal number
    assert answer_template("<answer>5 + 5 * 3</answer>", (5, 3, 5)) == answer_template(
        "<answer>5+5*3</answer>", [5, 3, 5])


def test_template_shares():
    texts = ["<answer>1 + 2</answer>"] * 3 + ["<answer>2 * 1</answer>", "x"]
    assert template_shares(texts, [(1, 2)] * 5, top=2) == {"a + b": 0.6, NO_ANSWER: 0.2, REST: 0.2}  # tie: by name
    assert template_shares(texts, [(1, 2)] * 5) == {"a + b": 0.6, NO_ANSWER: 0.2, "b * a": 0.2}  # no rest
    assert template_shares(["<answer>3 + 4</answer>", "<answer>10 + 20</answer>"], [(3, 4), (10, 20)]) == {
        "a + b": 1.0}  # the same shape on different puzzles
    assert template_shares([], []) == {}
    with pytest.raises(ValueError):
        template_shares(texts, [(1, 2)])
