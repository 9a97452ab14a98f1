"""What the training loop learns from: a Task gives prompts (deterministically by position) and scores completions.

The loop never looks inside a task, so the same loop trains Countdown (CountdownTask) and the toy tasks of the
learning test. A task's `score` returns the reward and two flags the metrics aggregate:
`solved` (full marks) and `format` (a well-formed answer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from data import countdown, prompts
from data.puzzles import Puzzle


@dataclasses.dataclass(frozen=True)
class Scored:
    reward: float
    solved: bool
    format: bool
    text: str


class Task(Protocol):
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


@dataclasses.dataclass
class CountdownTask:
    """TinyZero's Countdown: render the template, reward with data.countdown (exact parser, never eval)."""

    train: list[Puzzle]
    test: list[Puzzle]
    tokenizer: Any  # model.tokenizer.Tokenizer
    template: str = "base"
    seed: int = 0
    format_score: float = 0.1
    correct_score: float = 1.0

    def __post_init__(self):
        self.eos_ids = tuple(self.tokenizer.stop_ids)
        self._prompt_cache: dict[tuple, list[int]] = {}

    def train_items(self, position: int, count: int) -> list[Puzzle]:
        return items_at(self.train, position, count, self.seed)

    def eval_items(self) -> list[Puzzle]:
        return list(self.test)

    def prompt_text(self, item: Puzzle) -> str:
        return prompts.render(self.template, list(item.nums), item.target)

    def encode_prompt(self, item: Puzzle) -> list[int]:
        key = (tuple(item.nums), item.target)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.tokenizer.encode(self.prompt_text(item), add_bos=True)
        return self._prompt_cache[key]

    def decode(self, completion: np.ndarray) -> str:
        ids = [int(t) for t in completion if int(t) not in self.eos_ids]
        return self.tokenizer.decode(ids)

    def score(self, item: Puzzle, completion: np.ndarray) -> Scored:
        text = self.decode(completion)
        b = countdown.breakdown(text, list(item.nums), item.target, format_score=self.format_score,
                                correct_score=self.correct_score)
        return Scored(reward=b.score, solved=b.solved, format=b.has_answer, text=text)
