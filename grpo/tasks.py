"""What the training loop learns from: a Task gives prompts (deterministically by position) and scores completions.

The loop never looks inside a task, so the same loop trains Countdown (CountdownTask) and the toy tasks of the
learning test. A task's `score` returns the reward and two flags the metrics aggregate: `solved` (full marks)
and `format` (a well-formed answer). A task may also offer `describe(item) -> dict`: the item as JSON fields
for the sample logs (Countdown: nums and target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from data import curriculum, prompts
from data.curriculum import Level
from data.puzzles import Puzzle
from data.templates import template_shares
from model.stop_text import cached_stop_table

ANSWER_CLOSE = "</answer>"


@dataclasses.dataclass(frozen=True)
class Scored:
    reward: float
    solved: bool
    format: bool
    text: str


class Task(Protocol):
    """What the loop needs. Optional: `level_names` with train_items(..., level=) and eval_items(level=) (a
    difficulty ladder), `describe(item)` (sample logs), `stop_table()` (stop rollouts at a string)."""

    eos_ids: tuple[int, ...]

    def train_items(self, position: int, count: int) -> list[Any]: ...

    def eval_items(self) -> list[Any]: ...

    def encode_prompt(self, item: Any) -> list[int]: ...

    def score(self, item: Any, completion: np.ndarray) -> Scored: ...


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """A fixed shuffle per epoch: position p of the stream is item order(p // n)[p % n]."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def items_at(items: list, position: int, count: int, seed: int) -> list:
    n = len(items)
    out = []
    for p in range(position, position + count):
        out.append(items[int(epoch_order(n, p // n, seed)[p % n])])
    return out


@dataclasses.dataclass(frozen=True)
class LevelPuzzle:
    """A Countdown puzzle and the index of the difficulty level it belongs to (its reward depends on it)."""

    puzzle: Puzzle
    level: int = 0


@dataclasses.dataclass
class CountdownTask:
    """TinyZero's Countdown on a difficulty ladder (data/curriculum.py): render the template, reward with the
    level's rule (data.countdown's exact parser, never eval). One level (TinyZero's) without a curriculum.

    train[i] / test[i] are level i's puzzles; the loop asks for train items of its current level and evaluates
    every level's held-out set.
    """

    train: list[list[Puzzle]]
    test: list[list[Puzzle]]
    tokenizer: Any  # model.tokenizer.Tokenizer
    template: str = "base"
    seed: int = 0
    levels: tuple[Level, ...] = curriculum.OFF
    stop_text: str = ANSWER_CLOSE  # rollouts may stop once the text holds it (RolloutConfig.stop_at_answer)

    def __post_init__(self):
        if not (len(self.train) == len(self.test) == len(self.levels)):
            raise ValueError(f"{len(self.levels)} levels need as many train and test lists, got "
                             f"{len(self.train)} and {len(self.test)}")
        self.eos_ids = tuple(self.tokenizer.stop_ids)
        self._prompt_cache: dict[tuple, list[int]] = {}
        self._stop_table: np.ndarray | None = None

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def train_items(self, position: int, count: int, level: int = 0) -> list[LevelPuzzle]:
        return [LevelPuzzle(p, level) for p in items_at(self.train[level], position, count, self.seed)]

    def eval_items(self, level: int | None = None) -> list[LevelPuzzle]:
        """Level `level`'s held-out puzzles; None: the top (TinyZero) level's."""
        level = len(self.levels) - 1 if level is None else level
        return [LevelPuzzle(p, level) for p in self.test[level]]

    def prompt_text(self, item: LevelPuzzle) -> str:
        example = self.levels[item.level].example_for(item.puzzle)
        return prompts.render(self.template, list(item.puzzle.nums), item.puzzle.target, example)

    def encode_prompt(self, item: LevelPuzzle) -> list[int]:
        key = (tuple(item.puzzle.nums), item.puzzle.target, item.level)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.tokenizer.encode(self.prompt_text(item), add_bos=True)
        return self._prompt_cache[key]

    def decode(self, completion: np.ndarray) -> str:
        ids = [int(t) for t in completion if int(t) not in self.eos_ids]
        return self.tokenizer.decode(ids)

    def describe(self, item: LevelPuzzle) -> dict:
        """The puzzle as JSON fields for the sample logs."""
        return {"nums": [int(n) for n in item.puzzle.nums], "target": int(item.puzzle.target),
                "level": self.levels[item.level].name}

    def answer_templates(self, items: list[LevelPuzzle], texts: list[str]) -> dict[str, float]:
        """The most common answer shapes of these completions ("a + b + c": given numbers as letters in the order
        given; data/templates.py) -> share: shows a policy that answers without reading the target."""
        return template_shares(texts, [it.puzzle.nums for it in items])

    def score(self, item: LevelPuzzle, completion: np.ndarray) -> Scored:
        text = self.decode(completion)
        reward, solved, has_answer = self.levels[item.level].reward.score(text, item.puzzle.nums, item.puzzle.target)
        return Scored(reward=reward, solved=solved, format=has_answer, text=text)

    def stop_table(self) -> np.ndarray:
        """The sampler's automaton for stop_text over this tokenizer (built once per process)."""
        if self._stop_table is None:
            self._stop_table = cached_stop_table(self.tokenizer.piece_texts(), self.stop_text)
        return self._stop_table
