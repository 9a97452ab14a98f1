"""A ladder that follows the learner: which difficulty level each prompt of a step comes from.

Why: a group whose G samples all pass or all fail has zero advantages, so the levels that teach are those the
policy solves about half the time (p (1 - p) is largest at p = 0.5: AdaRFT, Shi et al. 2025; online difficulty
filtering, Bae et al. 2025). Training only on the newest level, as the ladder did first, spends the batch on
puzzles the policy almost never solves right after a promotion, and lets earlier levels be forgotten.

The rule, over the levels from the ladder's first up to the frontier f (the hardest level being trained; it starts
at --start_level, promotion moves it up, never down):

    w_i = p_i (1 - p_i)          p_i = (solved + 1) / (rows + 2): the level's recent sampled solved rate,
                                 Laplace-smoothed (unseen: 0.5), so a level seen at 0/8 keeps some weight
                                 and is measured again instead of dropping out for good
    w_f = max(w_f, FRONTIER_MIN_WEIGHT)   the level being climbed is always trained, even near p = 0
    shares = w / sum(w), the frontier's share raised to at least FRONTIER_MIN_WEIGHT too (else five earlier
             levels near p = 0.5, 0.25 each, would leave it 7%), then the levels below f together get at
             least `floor` (so they are not forgotten; the floor wins where the two conflict)

Each prompt's level is then drawn from `shares` with a generator seeded by (seed, step, round), so a resumed
run draws the same levels. With mixing off every prompt is the frontier's (the ladder's first behaviour).

The solved-rate estimate is a decayed count (`LevelStats`): solved and sampled rows, both multiplied by DECAY each
step the level is seen, so a level sampled in a few rows per step still gets a stable estimate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FRONTIER_MIN_WEIGHT = 0.1  # p (1 - p) of p ~ 0.11: a frontier solved ~1 in 9 samples keeps its full weight
DECAY = 0.7  # per step a level is sampled: ~3 steps of memory


@dataclasses.dataclass(frozen=True)
class LevelStats:
    """Decayed counts of one level's sampled rows and solved rows (the rate is solved / rows)."""

    solved: float = 0.0
    rows: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.solved / self.rows if self.rows > 0 else None

    @property
    def smoothed(self) -> float:
        """(solved + 1) / (rows + 2): the rate the mix weighs by (0.5 for a level not sampled yet)."""
        return (self.solved + 1) / (self.rows + 2)

    def update(self, solved: int, rows: int) -> LevelStats:
        if rows <= 0:
            return self
        return LevelStats(DECAY * self.solved + solved, DECAY * self.rows + rows)


def level_shares(rates: list[float], frontier: int, floor: float, mix: bool = True) -> np.ndarray:
    """[levels] float64: the share of a step's prompts drawn from each level, from each level's smoothed solved
    rate (see the module docstring)."""
    shares = np.zeros(len(rates))
    if not mix or frontier == 0:
        shares[frontier] = 1.0
        return shares
    p = np.array(rates[: frontier + 1], dtype=np.float64)
    w = p * (1 - p)
    w[-1] = max(w[-1], FRONTIER_MIN_WEIGHT)
    w = w / w.sum()
    if w[-1] < FRONTIER_MIN_WEIGHT:  # the earlier levels give up the difference in proportion
        w = np.append(w[:-1] * (1 - FRONTIER_MIN_WEIGHT) / w[:-1].sum(), FRONTIER_MIN_WEIGHT)
    below = w[:-1].sum()
    if below < floor:  # lift the earlier levels to the floor, in proportion (equally if all weigh 0)
        earlier = w[:-1] / below if below > 0 else np.full(len(w) - 1, 1.0 / (len(w) - 1))
        w = np.append(floor * earlier, 1.0 - floor)
    shares[: frontier + 1] = w
    return shares


def draw_levels(shares: np.ndarray, count: int, seed: int, step: int, round_: int = 0) -> np.ndarray:
    """[count] int: each prompt's level, drawn from `shares` by a generator seeded by (seed, step, round)."""
    if np.count_nonzero(shares) == 1:  # one level: no draw (the same stream as a run without mixing)
        return np.full(count, int(np.argmax(shares)))
    rng = np.random.default_rng([seed, step, round_, 0x1E7E1])
    return rng.choice(len(shares), size=count, p=shares / shares.sum())


def start_index(names: tuple[str, ...], start: str | None) -> int:
    """The index of level `start` (None: 0); a name not in the ladder is a ValueError naming start_level."""
    if start is None:
        return 0
    if start not in names:
        raise ValueError(f"start_level: {start!r} is not a level of this ladder; choose from "
                         f"{', '.join(names) or 'none (no ladder)'}")
    return names.index(start)


def draw_items(task, shares: np.ndarray, position: int, count: int, seed: int, step: int, round_: int) -> list:
    """`count` prompts of a laddered task from stream position `position`: prompt j is item position + j of its
    drawn level's stream (each level has a stream of its own, so skipped positions lose nothing)."""
    levels = draw_levels(shares, count, seed, step, round_)
    if np.all(levels == levels[0]):  # one level: one call (the stream of a run without mixing)
        return task.train_items(position, count, level=int(levels[0]))
    return [task.train_items(position + j, 1, level=int(lv))[0] for j, lv in enumerate(levels)]


def update_stats(stats: tuple[LevelStats, ...], levels: np.ndarray, solved: np.ndarray) -> tuple[LevelStats, ...]:
    """Each level's estimate after a step whose sampled rows were at `levels` [B] and `solved` [B]."""
    return tuple(st.update(int(solved[levels == i].sum()), int((levels == i).sum())) for i, st in enumerate(stats))


def level_metrics(names: tuple[str, ...], shares: np.ndarray, levels: np.ndarray, solved: np.ndarray) -> dict:
    """level_shares (the mix the step drew from) and sampled_solved_by_level (the levels its rows came from)."""
    return {"level_shares": {n: round(float(x), 4) for n, x in zip(names, shares, strict=True) if x > 0},
            "sampled_solved_by_level": {names[i]: float(solved[levels == i].mean()) for i in np.unique(levels)}}
