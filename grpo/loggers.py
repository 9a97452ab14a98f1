"""Optional experiment loggers (`bin/train --log_to tensorboard,wandb`): the same per-step numbers that go to
metrics.jsonl, also sent where users already watch their runs. metrics.jsonl stays the record; these are views.

    loggers = make_loggers(["tensorboard"], output_dir, config)
    for lg in loggers: lg.log(step, metrics)                  # eval numbers: lg.log(step, eval_metrics, "eval/")
    for lg in loggers: lg.close()

Neither package is a dependency (extras `tensorboard` -> tensorboardX, `wandb` -> wandb); each is imported only
when asked for, and a missing one is a one-line ValueError naming --log_to and the pip command, raised before
any training starts. Only numbers are logged, dicts of them one curve per key: None (kl when beta == 0), strings
(the curriculum level) and non-finite values are skipped. Call these from process 0 only (the trainer's RunLog.main).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol

WANDB_PROJECT = "getting-to-aha"
# Shares of the answer shapes the completions took: new keys (curves) every step, and text as tag names.
UNLOGGED = ("answer_templates",)
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "wandb")}  # name: (module, extra pkg)


class Logger(Protocol):
    def log(self, step: int, metrics: dict, prefix: str = "") -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The loggable part of a metrics dict: finite numbers (bools as 0/1), keys prefixed; 'step' is the x axis,
    not a curve. Dicts of numbers become one curve per key, named by path (`solved_by_level/2x1-9`,
    `aha_by_level/2x1-9/aha_frac`): the per-level evals are where a ladder run's progress shows."""
    out = {}
    for key, value in metrics.items():
        if key in UNLOGGED:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
            continue
        if key == "step" or value is None or isinstance(value, str):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[prefix + key] = v
    return out


class TensorBoardLogger:
    """Event files under <output_dir>/tensorboard (tensorboardX: no TensorFlow, no torch). `tensorboard --logdir
    <output_dir>/tensorboard` shows them; the run config is logged once as text."""

    def __init__(self, output_dir: str, config: dict):
        from tensorboardX import SummaryWriter

        self.logdir = Path(output_dir) / "tensorboard"
        self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True, default=str) + "\n```")

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        for tag, value in scalars(metrics, prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # one flush a step: a watched run shows each step as it lands

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run under <output_dir>/wandb. Offline unless WANDB_MODE says otherwise (`wandb sync
    <output_dir>/wandb/offline-run-*` uploads it later), so a training run never waits on, or needs, the network."""

    def __init__(self, output_dir: str, config: dict):
        import wandb

        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(output_dir),
                              project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                              config=json.loads(json.dumps(config, default=str)))

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        self.run.log(scalars(metrics, prefix), step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def check_names(names: list[str]) -> list[str]:
    """--log_to's names, cleaned and de-duplicated; an unknown one or one whose package is missing is a ValueError
    of one line (so bin/train can check the flag before it loads a model)."""
    import importlib.util

    out = list(dict.fromkeys(n.strip().lower() for n in names if n and n.strip()))
    for name in out:
        if name not in LOGGERS:
            raise ValueError(f"--log_to: unknown logger {name!r} (choose from {', '.join(sorted(LOGGERS))})")
        module, package = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--log_to {name} needs the {package} package: pip install {package} "
                             f"(or pip install -e '.[{name}]')")
    return out


def make_loggers(names: list[str], output_dir: str, config: dict) -> list[Logger]:
    """One logger per name in --log_to ('tensorboard', 'wandb'); [] for none."""
    return [LOGGERS[name](output_dir, config) for name in check_names(names)]
