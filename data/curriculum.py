"""A difficulty ladder for Countdown: levels from one operation on two small numbers up to TinyZero's puzzles.

Why: before any RL the embedded Gemma 3 270M solves 0 of 128 samples even of two numbers in 1..9, so every
group's solve reward is equal and GRPO has nothing to push on. A ladder starts where a solve is within reach
and, on its first level (by default, `SHAPINGS` below), also pays for getting closer (shaped rewards); the top
level is TinyZero's distribution with TinyZero's reward, so results there compare with TinyZero's.

Rewards per level (`Level.reward`; 0 without an <answer> tag on the last line, as in TinyZero):

    answer tag, anything inside                                      format_score   (TinyZero: 0.1)
    a well-formed expression of some of the given numbers, no others  partial_score  (TinyZero: none)
    a well-formed expression using exactly the given numbers          numbers_score  (TinyZero: none)
    ... that reaches the target                                       1.0

"Well-formed" is data.countdown's own parser (numbers, + - * /, parentheses): the middle rungs pay for an
arithmetic expression, not for numbers in any text. A laptop run (BUILD.md, run 3) found `<answer>3, 9</answer>`
and `7 – 8` (an en dash) earning the exact-numbers rung before this rule.

The partial rung exists because a first laptop run (BUILD.md) settled on an EMPTY `<answer> </answer>`: with
format paid and nothing between it and the exact-numbers rung, no sampled group showed a gradient towards
writing numbers.

Ladders (`LADDERS`; bin/train --curriculum NAME). "countdown":

    level        numbers  range  targets  reward (format / partial / numbers / solved), --shaping legacy
    2x1-9        2        1..9   1..18    0.1 / 0.2  / 0.4  / 1.0     a + b, a * b, ...: one operation
    2x1-30       2        1..30  1..60    0.1 / 0.15 / 0.3  / 1.0
    3x1-30       3        1..30  10..100  0.1 / 0.15 / 0.25 / 1.0
    3x1-99       3        1..99  10..100  0.1 / 0.15 / 0.25 / 1.0     finer rungs up to TinyZero's puzzles
    4x1-30       4        1..30  10..100  0.1 / 0.15 / 0.25 / 1.0     (no worked example, like tinyzero)
    tinyzero     3-4      1..99  10..100  0.1 / -    / -    / 1.0     TinyZero's data and reward

3x1-30 to tinyzero changes the number range and the count at once; 3x1-99 and 4x1-30 change one at a time.

"balanced" is the same ladder with 2x1-20-ops and 2x1-30-ops first: their puzzles are drawn operation first, each
of + - * / solving exactly a quarter of them (data.puzzles.PuzzleConfig.balance_ops), held-out sets included. On
the countdown ladder's 2-number levels the sum alone solves about half of the puzzles, so a policy that always
answers `a + b` climbs them without reading the target (BUILD.md).

With the default shaping ("first_rung", SHAPINGS below) only the ladder's first level (2x1-9; 2x1-20-ops on the
balanced ladder) keeps its middle rungs; every level above it pays TinyZero's 0.1 / 1.0. Why: a middle rung pays
an answer that ignores the target on EVERY puzzle, so once the model writes expressions a fixed one (`a + b + c`)
earns it on the whole group, every sample agrees, and GRPO has no signal left (tests/test_reward_templates.py
checks that past the first level every fixed answer template's mean reward is TinyZero's). On the first level
the rungs stay on purpose: they are what gets the base model to write an expression of the given numbers at all
(the empty-answer run above).

Every level's held-out set is drawn from a seed of its own (not the run's --seed), so two runs evaluate on the
same puzzles and their eval.jsonl lines compare line by line.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from collections.abc import Sequence

from data import countdown
from data.prompts import WorkedExample
from data.puzzles import OPS, Puzzle, PuzzleConfig, make_splits, op_space, operation, stream

TINYZERO = "tinyzero"


@dataclasses.dataclass(frozen=True)
class LevelReward:
    """TinyZero's reward with optional middle rungs (None: no such rung, as in TinyZero)."""

    format_score: float = 0.1
    partial_score: float | None = None  # some of the given numbers and no others, not all of them
    numbers_score: float | None = None  # exactly the given numbers, wrong value
    correct_score: float = 1.0

    def score(self, completion: str, nums: Sequence[int], target: int) -> tuple[float, bool, bool]:
        """(reward, solved, has_answer) of one completion; the checks are data.countdown's (never eval)."""
        b = countdown.breakdown(completion, list(nums), target, format_score=self.format_score,
                                correct_score=self.correct_score)
        if b.solved or not b.has_answer or (self.partial_score is None and self.numbers_score is None):
            return b.score, b.solved, b.has_answer
        answer = countdown.extract_answer(completion)
        if countdown.evaluate(answer) is None:  # not an arithmetic expression: no middle rung
            return b.score, False, True
        if b.numbers_valid and self.numbers_score is not None:
            return float(self.numbers_score), False, True
        if self.partial_score is not None and _some_given_numbers(answer, nums):
            return float(self.partial_score), False, True
        return b.score, False, True


def _some_given_numbers(answer: str, nums: Sequence[int]) -> bool:
    """At least one number in the answer, and every one of them is a given number (as a multiset)."""
    found = [int(run) for run in re.findall(r"\d+", answer[: countdown.MAX_ANSWER_CHARS + 1])]
    left = list(nums)
    for n in found:
        if n not in left:
            return False
        left.remove(n)
    return bool(found)


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    puzzles: PuzzleConfig
    reward: LevelReward = LevelReward()
    # Solved puzzles, ONE of which is shown before each question (easy levels only); `example_for` picks it.
    examples: tuple[WorkedExample, ...] = ()

    def example_for(self, puzzle: Puzzle) -> WorkedExample | None:
        """The worked example shown with this puzzle: fixed per puzzle (a hash of its numbers and target, not
        Python's salted hash), so held-out prompts are the same in every run; None without examples."""
        if not self.examples:
            return None
        i = zlib.crc32(repr((tuple(puzzle.nums), puzzle.target)).encode()) % len(self.examples)
        ex = self.examples[i]
        if (tuple(sorted(ex.nums)), ex.target) == puzzle.key:  # never the puzzle's own solution
            i = (i + 1) % len(self.examples)
        return self.examples[i]

    def heldout_seed(self) -> int:
        """A seed from the level's name alone: the same held-out puzzles in every run."""
        return zlib.crc32(self.name.encode())


# Worked examples of the easy levels: a small search written out (try, check against the target, try again),
# so the model sees the answer format filled with the given numbers and a check that rejects a wrong try. One
# per operation: with a single example (7 - 3, run 4 in BUILD.md) the model copied its operation.
TWO_NUMBERS = (
    WorkedExample((7, 3), 10, "Try 7 + 3 = 10. Yes.", "7 + 3"),
    WorkedExample((7, 3), 4, "Try 7 + 3 = 10. Not 4. Try 7 - 3 = 4. Yes.", "7 - 3"),
    WorkedExample((6, 4), 24, "Try 6 + 4 = 10. Not 24. Try 6 * 4 = 24. Yes.", "6 * 4"),
    WorkedExample((8, 2), 4, "Try 8 + 2 = 10. Not 4. Try 8 - 2 = 6. Not 4. Try 8 / 2 = 4. Yes.", "8 / 2"),
)
THREE_NUMBERS = (
    WorkedExample((2, 3, 4), 14, "Try 2 + 3 + 4 = 9. Not 14. Try 3 * 4 = 12, 12 + 2 = 14. Yes.", "3 * 4 + 2"),
    WorkedExample((5, 2, 6), 16, "Try 5 + 2 + 6 = 13. Not 16. Try 5 * 2 = 10, 10 + 6 = 16. Yes.", "5 * 2 + 6"),
    WorkedExample((9, 3, 2), 5, "Try 9 + 3 + 2 = 14. Not 5. Try 9 / 3 = 3, 3 + 2 = 5. Yes.", "9 / 3 + 2"),
)
LADDERS: dict[str, tuple[Level, ...]] = {
    "countdown": (
        Level("2x1-9", PuzzleConfig(counts=(2,), num_min=1, num_max=9, target_min=1, target_max=18),
              LevelReward(partial_score=0.2, numbers_score=0.4), TWO_NUMBERS),
        Level("2x1-30", PuzzleConfig(counts=(2,), num_min=1, num_max=30, target_min=1, target_max=60),
              LevelReward(partial_score=0.15, numbers_score=0.3), TWO_NUMBERS),
        Level("3x1-30", PuzzleConfig(counts=(3,), num_min=1, num_max=30, target_min=10, target_max=100),
              LevelReward(partial_score=0.15, numbers_score=0.25), THREE_NUMBERS),
        Level("3x1-99", PuzzleConfig(counts=(3,), num_min=1, num_max=99, target_min=10, target_max=100),
              LevelReward(partial_score=0.15, numbers_score=0.25), THREE_NUMBERS),
        Level("4x1-30", PuzzleConfig(counts=(4,), num_min=1, num_max=30, target_min=10, target_max=100),
              LevelReward(partial_score=0.15, numbers_score=0.25)),
        Level(TINYZERO, PuzzleConfig()),
    ),
}


def _ops_level(name: str, num_max: int, reward: LevelReward) -> Level:
    """A 2-number level with each of + - * / solving a quarter of its puzzles (PuzzleConfig.balance_ops)."""
    puzzles = PuzzleConfig(counts=(2,), num_min=1, num_max=num_max, target_min=1, target_max=2 * num_max,
                           balance_ops=True)
    return Level(name, puzzles, reward, TWO_NUMBERS)


# "balanced": the countdown ladder with 2-number levels drawn operation first, so no fixed answer passes them
# (the promotion bar, 0.35 in the recipes, is above the quarter one operation solves); its first level has numbers
# up to 20, not 9: on 1..9 only a dozen puzzles are a product alone, too few to hold out a balanced 64 and train
# on the rest. The levels from 3x1-30 up are the countdown ladder's, with the same held-out puzzles, so the two
# ladders' runs compare there.
LADDERS["balanced"] = (_ops_level("2x1-20-ops", 20, LADDERS["countdown"][0].reward),
                       _ops_level("2x1-30-ops", 30, LADDERS["countdown"][1].reward), *LADDERS["countdown"][2:])
# --curriculum off: the single TinyZero level, today's behaviour.
OFF = (Level(TINYZERO, PuzzleConfig()),)


# How the middle rungs are paid (bin/train --shaping). "first_rung": on the ladder's first level only; above it
# TinyZero's reward, so no answer that ignores the target pays more than a formatted wrong one (an accelerator
# run's policy answered every 3-number puzzle `a + b + c` for the exact-numbers rung: BUILD.md). "legacy": every
# level as LADDERS defines it. "off": TinyZero's reward on every level.
SHAPINGS = ("first_rung", "legacy", "off")


def ladder(name: str | None, shaping: str = "first_rung") -> tuple[Level, ...]:
    """The levels of a named ladder, easiest first, their rewards shaped as `shaping` says; None or "off" is
    TinyZero's level alone."""
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping {shaping!r}; choose from {', '.join(SHAPINGS)}")
    if name in (None, "off"):
        return OFF
    if name not in LADDERS:
        raise ValueError(f"unknown curriculum {name!r}; choose from off, {', '.join(sorted(LADDERS))}")
    levels = LADDERS[name]
    if shaping == "legacy":
        return levels
    shaped = 1 if shaping == "first_rung" else 0
    return (*levels[:shaped], *(dataclasses.replace(lv, reward=LevelReward()) for lv in levels[shaped:]))


def heldout_split(level: Level, num_heldout: int) -> list[Puzzle]:
    """The level's held-out puzzles, distinct, from the level's own seed: the same in every run (balance_ops
    levels: a quarter of each operation)."""
    if level.puzzles.balance_ops:
        return balanced_heldout(num_heldout, level.heldout_seed(), level.puzzles)
    return make_splits(0, num_heldout, level.heldout_seed(), level.puzzles)[1]


def train_split(level: Level, num_train: int, seed: int, exclude: set) -> list[Puzzle]:
    """The run's stream of the level's puzzles (repeats allowed, like TinyZero's rows) minus the keys in exclude:
    EVERY level's held-out puzzles, since the levels' puzzle spaces nest (2x1-30's stream holds 2x1-9's)."""
    if level.puzzles.balance_ops:
        try:
            return balanced_train(num_train, seed, level.puzzles, exclude)
        except ValueError as e:
            raise ValueError(f"level {level.name}: {e}") from None
    train: list[Puzzle] = []
    drawn = num_train
    while len(train) < num_train:  # a prefix of a longer draw of the same stream
        train = [p for p in make_splits(drawn, 0, seed, level.puzzles)[0] if p.key not in exclude][:num_train]
        if not train and drawn >= EMPTY_AFTER:
            raise ValueError(f"level {level.name}: every one of its puzzles is held out; lower --eval_size")
        drawn *= 2
    return train


EMPTY_AFTER = 4096  # draws with no puzzle left over: the held-out sets cover the level's whole (small) space


def balanced_heldout(n: int, seed: int, cfg: PuzzleConfig) -> list[Puzzle]:
    """n distinct balance_ops puzzles, a quarter of each operation (the first of each in the stream, in its order).
    Why not the stream's first n distinct: the rare operations' spaces are small (a dozen `*` puzzles on 1..9), so
    those fill up first and the set, and the training stream left after it, would not be balanced. Each operation
    holds out at most half of its puzzles, so this level's training keeps the rest (less any other level's
    held-out puzzles that fall in its space); a larger n is a ValueError naming num_test."""
    space = op_space(cfg)
    rarest = min(OPS, key=space.__getitem__)
    if n > (most := len(OPS) * (space[rarest] // 2)):
        raise ValueError(f"num_test {n}: a balanced held-out set holds a quarter of each operation, at most half of "
                         f"its puzzles (the rest stay for training); {rarest} alone makes {space[rarest]}: at most "
                         f"{most}")
    quota = {op: n // len(OPS) + (i < n % len(OPS)) for i, op in enumerate(OPS)}
    out: list[Puzzle] = []
    seen: set = set()
    draws = stream(seed, cfg)
    while len(out) < n:
        p = next(draws)
        if quota[operation(p)] and p.key not in seen:
            seen.add(p.key)
            out.append(p)
            quota[operation(p)] -= 1
    return out


def balanced_train(n: int, seed: int, cfg: PuzzleConfig, exclude: set) -> list[Puzzle]:
    """n balance_ops puzzles (repeats allowed) in the stream's order of operations, each the next puzzle of its
    operation in the stream that is not in exclude: excluding held-out puzzles leaves the operations balanced."""
    labels, queues, need = [], {op: [] for op in OPS}, None
    for drawn, p in enumerate(stream(seed, cfg)):
        if drawn < n:
            labels.append(operation(p))
        elif need is None:
            need = collections.Counter(labels)
        if p.key not in exclude:
            queues[operation(p)].append(p)
        if need is not None and all(len(queues[op]) >= need[op] for op in OPS):
            break
        if drawn > 64 * (n + 1000):  # an operation whose every puzzle is excluded (other levels' held-out sets)
            op = min(OPS, key=lambda o: len(queues[o]))
            raise ValueError(f"every {op} puzzle is held out: lower the held-out size")
    per_op = {op: iter(queue) for op, queue in queues.items()}
    return [next(per_op[op]) for op in labels]


def level_splits(level: Level, num_train: int, num_heldout: int, seed: int,
                 exclude: frozenset = frozenset()) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, held-out): held-out from the level's own seed, train from the run's seed without the held-out
    puzzles (nor those in exclude)."""
    heldout = heldout_split(level, num_heldout)
    return train_split(level, num_train, seed, exclude | {p.key for p in heldout}), heldout
