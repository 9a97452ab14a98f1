"""DAPO's dynamic sampling: keep sampling until a step's batch holds groups that teach something.

Why: a group whose G rewards are all equal has zero advantages. On the first accelerator run nearly every group
was such at 3x1-30 (BUILD.md), so the step's gradient came from one or two groups, or none. DAPO (Yu et
al. 2025, arXiv 2503.14476) over-samples and keeps only groups with 0 < accuracy < 1; here "has signal" is
"its rewards differ", the same thing for a 0/1 reward and the right test for a shaped one.

The rule: round r samples prompts_per_step prompts (one compiled sampler shape for every round); rounds go on
while fewer than prompts_per_step groups have signal and at most floor(max_oversample) rounds have run. The
batch is then the first prompts_per_step groups with signal, in sampling order, filled up with groups without
signal when the cap is reached (their advantages are 0; RolloutConfig.skip_zero_std_groups decides whether they
count in the loss). So the batch shape never changes and nothing recompiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from grpo.rollout import SampledRows, concat_rows, take_groups, zero_std_groups


def max_rounds(max_oversample: float) -> int:
    """Sampler rounds of prompts_per_step prompts that stay within max_oversample x prompts_per_step prompts."""
    return max(1, math.floor(max_oversample + 1e-9))


def pick_groups(rewards: np.ndarray, num_generations: int, count: int) -> np.ndarray:
    """[count] group indices: the groups with signal first (sampling order), then the silent ones."""
    silent = zero_std_groups(rewards, num_generations)
    order = np.concatenate([np.flatnonzero(~silent), np.flatnonzero(silent)])
    return order[:count]


def sample_with_signal(sample_round: Callable[[int], SampledRows], prompts: int, num_generations: int,
                       rounds: int) -> tuple[SampledRows, SampledRows, int]:
    """(every sampled row, the rows of the batch's groups, rounds run). sample_round(r) samples round r's groups;
    rounds = 1 is a plain step (the batch is round 0 as sampled)."""
    parts: list[SampledRows] = []
    signal = 0
    for r in range(rounds):
        parts.append(sample_round(r))
        signal += int((~zero_std_groups(parts[-1].rewards, num_generations)).sum())
        if signal >= prompts:
            break
    rows = concat_rows(parts)
    if len(parts) == 1 and rounds == 1:
        return rows, rows, 1
    return rows, take_groups(rows, pick_groups(rows.rewards, num_generations, prompts), num_generations), len(parts)
