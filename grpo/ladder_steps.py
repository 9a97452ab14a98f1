"""The loop's side of the difficulty ladder: which levels a step's prompts come from (grpo/level_mix.py decides),
the per-level solved-rate estimates, and promotion of the frontier.

Functions of the trainer's RunContext and LoopState (grpo/run_state.py), kept apart so the trainer reads as its
phases.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from grpo import level_mix
from grpo.level_mix import LevelStats
from grpo.rollout import SampledRows
from grpo.run_state import LoopState, RunContext
from grpo.tasks import Task


def step_level_shares(ctx: RunContext, state: LoopState) -> np.ndarray | None:
    """The share of this step's prompts per level (grpo/level_mix.py); None for a task without levels."""
    names = level_names(ctx.task)
    if not names:
        return None
    return level_mix.level_shares([s.smoothed for s in stats_of(state, len(names))], state.level,
                                  ctx.train_cfg.level_floor, mix=ctx.train_cfg.level_mix)


def draw_items(ctx: RunContext, state: LoopState, shares: np.ndarray | None, position: int, count: int,
               round_: int) -> list:
    if shares is None:
        return ctx.task.train_items(position, count)
    return level_mix.draw_items(ctx.task, shares, position, count, ctx.train_cfg.seed, state.step, round_)


def stats_of(state: LoopState, n: int) -> tuple[LevelStats, ...]:
    return state.level_stats if len(state.level_stats) == n else (LevelStats(),) * n


def levels_solved(rows: SampledRows) -> tuple[np.ndarray, np.ndarray]:
    """[B] each row's level and [B] whether it was solved."""
    return np.array([getattr(it, "level", 0) for it in rows.items]), np.array([s.solved for s in rows.scored])


def level_metrics(ctx: RunContext, rows: SampledRows, shares: np.ndarray | None) -> dict:
    names = level_names(ctx.task)
    return level_mix.level_metrics(names, shares, *levels_solved(rows)) if names else {}


def level_names(task: Task) -> tuple[str, ...]:
    return tuple(getattr(task, "level_names", ()) or ())


def after_levels(ctx: RunContext, state: LoopState, every: SampledRows) -> LoopState:
    """Fold the step's sampled rows (all of them, before dynamic sampling chose its groups) into the per-level
    solved-rate estimates, then promote on the frontier's own rows (a step without any leaves it as it is)."""
    levels, solved = levels_solved(every)
    stats = level_mix.update_stats(stats_of(state, len(level_names(ctx.task))), levels, solved)
    state = dataclasses.replace(state, level_stats=stats)
    mine = levels == state.level
    return promote(ctx, state, float(solved[mine].mean())) if mine.any() else state


def promote(ctx: RunContext, state: LoopState, solved_frac: float) -> LoopState:
    """Record this step's sampled solved rate on the frontier's rows; move the frontier up once the last
    promote_window such steps average at least promote_at (the window starts afresh on the new level)."""
    window, names = ctx.train_cfg.promote_window, level_names(ctx.task)
    recent = (*state.recent_solved, solved_frac)[-window:]
    if len(recent) == window and np.mean(recent) >= ctx.train_cfg.promote_at and state.level + 1 < len(names):
        ctx.log.say(f"promoted to level {names[state.level + 1]} after step {state.step} (solved rate "
                    f"{np.mean(recent):.2f} over the last {window} steps at {names[state.level]})")
        return dataclasses.replace(state, level=state.level + 1, recent_solved=())
    return dataclasses.replace(state, recent_solved=recent)
