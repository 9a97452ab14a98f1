"""The rollout's pieces on hand-made inputs: the training batch's layout (build_batch), groups without signal left
out of the loss (make_rollout), a Countdown completion's score per level (CountdownTask.score), pass@k's count.

References: arrays written out from grpo/rollout.py's layout diagram; data/curriculum.py's reward table (2x1-9 with
the default shaping: 0.1 format / 0.2 some numbers / 0.4 exactly the numbers / 1.0 solved; tinyzero: 0.1 / 1.0).
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_model import train_tokenizer

from data import curriculum
from data.puzzles import Puzzle
from grpo import evaluation
from grpo.rollout import RolloutConfig, SampledRows, build_batch, make_rollout
from grpo.tasks import CountdownTask, LevelPuzzle, Scored
from model.config import tiny_config
from model.sampler import SampleResult
from model.tokenizer import Tokenizer


def test_build_batch_layout():
    """Prompts left-padded into the bucket of the longest (16 for 5 tokens), completions right after, cut at their
    length (what lies past it in the sampler's output is not copied)."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    completions = np.array([[20, 21, 99, 99], [30, 31, 32, 33]], np.int32)
    batch = build_batch(prompts, completions, np.array([2, 4]), np.array([False, True]), np.array([0.5, -0.5]))
    pad = lambda n: [0] * n  # noqa: E731
    np.testing.assert_array_equal(batch["tokens"], [pad(13) + [5, 6, 7, 20, 21] + pad(2),
                                                    pad(11) + [8, 9, 10, 11, 12, 30, 31, 32, 33]])
    np.testing.assert_array_equal(batch["attention_mask"], [pad(13) + [1] * 5 + pad(2), pad(11) + [1] * 9])
    np.testing.assert_array_equal(batch["completion_mask"], [pad(16) + [1, 1, 0, 0], pad(16) + [1] * 4])
    np.testing.assert_array_equal(batch["advantages"], np.float32([0.5, -0.5]))
    np.testing.assert_array_equal(batch["truncated"], np.float32([0, 1]))


def _rows(rewards: list[float]) -> SampledRows:
    n = len(rewards)
    scored = [Scored(reward=r, solved=r == 1.0, format=True, text="") for r in rewards]
    return SampledRows([[2, 7]] * n, list(range(n)), np.full((n, 3), 9, np.int32), np.full(n, 3), np.zeros(n, bool),
                       scored, 0.0)


@pytest.mark.parametrize("skip", [True, False])
def test_groups_without_signal_leave_the_loss(skip):
    """Group 0's rewards are all equal (no advantage to learn from), group 1's differ: with skip_zero_std_groups the
    first group's completion tokens leave the loss's count, the second's stay; without it both stay."""
    rows = _rows([0.1] * 4 + [0.1, 1.0, 0.1, 0.1])
    rollout = make_rollout(rows, 4, RolloutConfig(skip_zero_std_groups=skip), "group", pad_id=0)
    mask = rollout.batch["completion_mask"].sum(axis=1)  # completion tokens per row in the loss
    np.testing.assert_array_equal(mask, [0 if skip else 3] * 4 + [3] * 4)
    np.testing.assert_array_equal(rollout.batch["advantages"][:4], 0.0)
    assert rollout.batch["advantages"][5] > 0 > rollout.batch["advantages"][4]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tok = Tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))
    levels = curriculum.ladder("countdown")
    empty = [[] for _ in levels]
    return CountdownTask(train=empty, test=empty, tokenizer=tok, levels=levels)


@pytest.mark.parametrize("answer,first,top", [
    ("3 + 5", (1.0, True, True), (1.0, True, True)),  # solved: 3 + 5 = 8
    ("3 * 5", (0.4, False, True), (0.1, False, True)),  # exactly the numbers, wrong value: a rung on 2x1-9 only
    ("5", (0.2, False, True), (0.1, False, True)),  # some of the numbers
    (None, (0.0, False, False), (0.0, False, False)),  # no answer tag
])
def test_countdown_score_per_level(task, answer, first, top):
    """The same completion scored on the ladder's first level and on its top (TinyZero's) level; the stop ids
    after the answer are dropped before decoding."""
    tok = task.tokenizer
    text = "<think> add them </think> " + (f"<answer> {answer} </answer>" if answer else "no answer")
    completion = np.array([*tok.encode(text, add_bos=False), *task.eos_ids])
    for level, want in ((0, first), (len(task.levels) - 1, top)):
        got = task.score(LevelPuzzle(Puzzle((3, 5), 8), level), completion)
        assert (got.reward, got.solved, got.format) == pytest.approx(want), (level, answer)
        assert "<end_of_turn>" not in got.text and got.text.strip() == text


def test_pass_at_k_counts_puzzles_solved_at_least_once(task, monkeypatch):
    """k = 2 samples of 3 puzzles, solved [[yes, no], [no, no], [yes, yes]] (the sampler scripted): pass@1 = 3 / 6,
    pass@2 = 2 / 3 (a count over puzzles, not samples)."""
    tok = task.tokenizer
    right, wrong = (tok.encode(f"<answer> {a} </answer>", add_bos=False) for a in ("3 + 5", "3 * 5"))
    width = max(len(right), len(wrong))
    script = [right, wrong, wrong, wrong, right, right]
    tokens = np.array([t + [0] * (width - len(t)) for t in script], np.int32)

    def scripted(params, cfg, prompts, key, chunk, **kw):
        assert len(prompts) == 6  # each puzzle k times, puzzle-major
        return SampleResult(tokens, np.array([len(t) for t in script]), np.zeros(tokens.shape, np.float32),
                            np.zeros(6, bool))

    monkeypatch.setattr(evaluation, "generate_in_chunks", scripted)
    items = [LevelPuzzle(Puzzle((3, 5), 8), 0)] * 3
    cfg = tiny_config("gemma3", vocab_size=tok.vocab_size)
    out = evaluation.pass_at_k(None, cfg, task, items, 2, RolloutConfig(stop_at_answer=False), None)
    assert (out["pass@1"], out["pass@2"], out["format"]) == (0.5, pytest.approx(2 / 3), 1.0)


def test_the_console_says_when_a_step_updates_nothing():
    from grpo.run_files import console_line

    m = {"step": 3, "reward_mean": 0.1, "solved_frac": 0.0, "format_frac": 1.0, "completion_len_mean": 9.0,
         "aha_count": 0, "sample_s": 1.0, "train_s": 1.0, "sample_tokens_per_s": 9.0, "num_completion_tokens": 0.0}
    assert console_line(m).endswith(" | no update: no token to learn from")
    assert "no update" not in console_line({**m, "num_completion_tokens": 12.0})
