"""The guard: a run that degrades stops (or rolls back to its best model) instead of training on to the end.

Why: on the first accelerator run the held-out score peaked, then a fixed entropy bonus filled the completions
with random tokens, the eval format collapsed and the run trained on to its end with every value finite (BUILD.md,
issue 23's section). Non-finite steps were the only stop.

It watches drops, not levels. Each condition arms once it has been inside its limits after `warmup_steps`, so a
base model that starts without the format, or a run whose entropy starts high, does not trip it; it fires once
its metric has been outside its limits for `patience` consecutive evals (eval metrics) or steps (per-step ones):

    format     the held-out format rate (mean over the levels)   more than format_drop below its best
    score      the held-out solved rate (mean over the levels)   more than score_drop below its best
    entropy    the policy's entropy per completion token          above grpo.entropy_control.ENTROPY_BAND
    nonfinite  steps skipped for a non-finite loss or gradient    max_bad_steps in a row (always armed, and
                                                                  kept on by --noguard)

`format` and `score` arm once their best is at least the drop (there is something to lose). Entropy below the
band (a near-deterministic policy) is the report's warning, not a stop: a policy that has converged on right
answers is low-entropy too, and the adaptive bonus (grpo/entropy_control.py) answers a collapse. The guard's state
is data (`GuardState`), checkpointed with the run, so a resumed run continues the same count.
"""

from __future__ import annotations

import dataclasses

from grpo.entropy_control import ENTROPY_BAND

ACTIONS = ("stop", "rollback")
EVAL_METRICS = ("format", "score")
STEP_METRICS = ("entropy", "nonfinite")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """When the guard fires and what it does then (bin/train --guard, --guard_*)."""

    enabled: bool = True  # False: only the non-finite condition stays
    warmup_steps: int = 5  # no condition but nonfinite arms before this many steps
    patience: int = 3  # consecutive evals (eval metrics) or steps (per-step metrics) outside the limits
    format_drop: float = 0.3  # held-out format this far below its best is degraded
    score_drop: float = 0.15  # held-out solved rate this far below its best is degraded
    max_bad_steps: int = 3  # non-finite steps in a row
    action: str = "stop"  # stop, or rollback: restore best/, scale the learning rate, go on
    max_rollbacks: int = 2  # then stop
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"guard_action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.patience < 1:
            raise ValueError(f"guard_patience must be >= 1, got {self.patience}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        for name in ("warmup_steps", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{'guard_' * (name == 'warmup_steps')}{name} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError(f"rollback_lr_factor must be in (0, 1], got {self.rollback_lr_factor}")


@dataclasses.dataclass(frozen=True)
class Watch:
    """One condition's state: armed, its best value so far, consecutive observations outside its limits and
    the step where that stretch began."""

    armed: bool = False
    best: float | None = None
    bad: int = 0
    since: int | None = None


@dataclasses.dataclass(frozen=True)
class GuardState:
    watches: dict = dataclasses.field(default_factory=dict)  # metric name -> Watch
    rollbacks: int = 0

    def to_json(self) -> dict:
        return {"watches": {k: dataclasses.asdict(w) for k, w in self.watches.items()}, "rollbacks": self.rollbacks}

    @staticmethod
    def from_json(d: dict | None) -> GuardState:
        d = d or {}
        return GuardState({k: Watch(**w) for k, w in d.get("watches", {}).items()}, int(d.get("rollbacks", 0)))


@dataclasses.dataclass(frozen=True)
class Alarm:
    """A condition that fired: which metric, since which step, and one line saying what degraded."""

    metric: str
    since: int
    detail: str


def _limits(cfg: GuardConfig, name: str, value: float, best: float | None) -> tuple[bool, str]:
    """(inside its limits, why not) for one observation; `best` is the best before this one."""
    if name == "entropy":
        high = ENTROPY_BAND[1]
        return value <= high, f"entropy {value:.3f} nats/token above the band's top ({high:g}): noise"
    if name == "nonfinite":
        return value < cfg.max_bad_steps, f"{int(value)} non-finite steps in a row"
    drop = cfg.format_drop if name == "format" else cfg.score_drop
    what = "eval format" if name == "format" else "held-out solved rate"
    # a tolerance for float subtraction: 0.9 - 0.3 is 0.6000000000000001, and a drop of exactly the limit is inside
    return best is None or best - value <= drop + 1e-9, f"{what} {value:.3f}, more than {drop:g} below its best {best}"


def _arms(cfg: GuardConfig, name: str, value: float, best: float) -> bool:
    if name == "nonfinite":
        return True
    if name == "entropy":
        return _limits(cfg, name, value, None)[0]
    return best >= (cfg.format_drop if name == "format" else cfg.score_drop)


def observe(cfg: GuardConfig, state: GuardState, step: int, values: dict[str, float | None]) -> tuple[GuardState,
                                                                                                     Alarm | None]:
    """The guard after observing `values` (metric name -> value; None: not measured) at `step`; an Alarm when a
    condition has been outside its limits for `patience` observations in a row (nonfinite: at once)."""
    watches, alarm = dict(state.watches), None
    for name, value in values.items():
        if value is None or (not cfg.enabled and name != "nonfinite"):
            continue
        w = watches.get(name, Watch())
        ok, why = _limits(cfg, name, value, w.best)
        best = value if w.best is None or name in EVAL_METRICS and value > w.best else w.best
        if name not in EVAL_METRICS:
            best = None
        armed = name == "nonfinite" or w.armed or step >= cfg.warmup_steps and ok and _arms(cfg, name, value,
                                                                                            best or 0.0)
        bad = w.bad + 1 if armed and not ok else 0
        since = (w.since if w.bad else step) if bad else None
        if bad and name == "nonfinite":  # the value counts the skipped steps: the stretch began that many back
            since = step - int(value) + 1
        watches[name] = Watch(armed, best, bad, since)
        needed = 1 if name == "nonfinite" else cfg.patience
        if bad >= needed and alarm is None:
            alarm = Alarm(name, since, why)
    return dataclasses.replace(state, watches=watches), alarm


def after_rollback(state: GuardState, metric: str) -> GuardState:
    """The state once a rollback has answered `metric`: its count starts afresh, and the eval watches start over
    (unarmed, no best). Their bests were the run's, but best/ holds the model grpo/best_model.py's eval_score
    ranks first (the top level first), which may be below them on the guard's means over the levels: kept, they
    would fire again at the restored model's first evals and spend every rollback on it."""
    watches = {name: Watch() if name in EVAL_METRICS else w for name, w in state.watches.items()}
    if metric in watches:
        watches[metric] = dataclasses.replace(watches[metric], bad=0, since=None)
    return GuardState(watches, state.rollbacks + 1)
