"""Keep the best: the state of the best held-out eval so far, in `<output_dir>/best/`, never rotated away.

Why: a run that degrades after its peak (BUILD.md, the first accelerator run) would otherwise end with only the
degraded model in final_hf/, and the good one only if a rolling checkpoint happened to land near it.

The score of an eval (`eval_score`) is compared in order: the top level's held-out solved rate (TinyZero's
puzzles), then every other level's from the hardest down, then the mean format rate; the first difference
decides. An eval strictly better than the best so far saves params and optimizer state there (the optimizer
state so a rollback can continue training from it). best/ is an orbax manager of its own that keeps one step:
orbax writes the new one into a temporary directory and removes the old one only after the rename, so a kill
during the write leaves the previous best.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grpo.checkpoints import TrainCheckpointer

BEST_DIR = "best"


def eval_score(metrics: dict) -> tuple[list[float], list[str]]:
    """(score, what each entry is) of one eval's metrics (grpo.evaluation.evaluate's)."""
    by_level = metrics.get("solved_by_level") or {}
    names = list(by_level)[::-1]  # hardest first: the top level, then down the ladder
    if names:
        values = [float(by_level[n]) for n in names]
    else:
        names, values = ["solved"], [float(metrics["eval_solved_frac"])]
    fmt = metrics.get("format_by_level") or {}
    mean_format = sum(fmt.values()) / len(fmt) if fmt else float(metrics["eval_format_frac"])
    return [*values, mean_format], [*names, "format"]


def better(score: list[float], best: list[float] | None) -> bool:
    """Is `score` strictly better than `best` (None: nothing saved yet), compared in order."""
    return best is None or tuple(score) > tuple(best)


class BestCheckpointer:
    """best/: one checkpoint of the best eval's state, with {"step", "score", "score_order", ...} as its record."""

    def __init__(self, output_dir: str | Path, async_save: bool = True):
        self.ckpt = TrainCheckpointer(Path(output_dir) / BEST_DIR, keep=1, async_save=async_save)

    @property
    def directory(self) -> Path:
        return self.ckpt.directory

    def save(self, step: int, params, opt_state, record: dict) -> None:
        """Replaces a best of the same step (a re-run's better eval of it: a run killed before its first checkpoint
        evaluates step 0 again, maybe with other settings); orbax refuses to save a step twice."""
        self.ckpt.replace(step, params, opt_state, record)

    def record(self, say: Callable[[str], None] = print) -> dict | None:
        """The saved best's record (cheap: no arrays read); a damaged one is set aside like any checkpoint."""
        return self.ckpt.latest_record(say)

    def restore(self, params_like, opt_state_like, say: Callable[[str], None] = print):
        """(step, params, opt_state, record) of the best, or None (none saved, or every copy damaged)."""
        self.ckpt.wait()
        return self.ckpt.restore_latest(params_like, opt_state_like, say=say)

    def close(self) -> None:
        self.ckpt.close()
