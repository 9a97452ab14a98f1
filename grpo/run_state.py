"""What a training run is made of, apart from the loop that runs it (grpo/trainer.py): its settings (TrainConfig),
what stays fixed for the run (RunContext), and what changes from step to step (LoopState, what a checkpoint holds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from grpo.best_model import BestCheckpointer
from grpo.checkpoints import TrainCheckpointer
from grpo.config import GRPOConfig
from grpo.guard import Alarm, GuardConfig, GuardState
from grpo.level_mix import LevelStats
from grpo.policy import Policy
from grpo.rollout import RolloutConfig
from grpo.run_files import RunLog
from grpo.tasks import Task
from model.config import GemmaConfig
from model.think_budget import ThinkBudget


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop around the GRPO step: length, eval, checkpoints, profiling, export."""

    output_dir: str
    steps: int = 5  # README's main job: the shortest run that shows puzzles solved on a laptop (BUILD.md)
    prompts_per_step: int = 6
    eval_every: int = 0  # 0: no periodic eval (step 0 and the final step still run when eval_size > 0)
    eval_size: int = 16  # held-out puzzles per level (the accelerator recipes take 64: BUILD.md)
    checkpoint_every: int = 2
    keep_checkpoints: int = 3
    seed: int = 0
    resume: bool = True
    profile_steps: tuple[int, int] | None = None  # [A, B] inclusive, wrapped in jax.profiler.trace
    time_limit_s: float | None = None  # pause (checkpoint, exit cleanly) before a step would end past this
    sample_groups_per_step: int = 4  # prompts whose G completions go to train_samples.jsonl each step
    export_hf: bool = True  # write the final params as an HF checkpoint dir (final_hf/)
    log_to: tuple[str, ...] = ()  # also send the numbers to "tensorboard" and/or "wandb" (grpo/loggers.py)
    # Difficulty ladder (tasks with level_names): move up a level once the sampled solved rate of the current
    # level, averaged over the last promote_window steps, reaches promote_at. Never down.
    promote_at: float = 0.35
    promote_window: int = 4
    # Which levels a step's prompts come from (grpo/level_mix.py): the levels up to the frontier, weighted
    # toward those solved about half the time, the earlier ones together at least level_floor of the
    # prompts. level_mix=False: every prompt from the frontier. start_level: the frontier at step 0 (a level
    # name; None: the ladder's first), as if the run had been promoted there.
    level_mix: bool = True
    level_floor: float = 0.1
    start_level: str | None = None
    guard: GuardConfig = GuardConfig()  # when a degrading run stops or rolls back (grpo/guard.py)
    eval_think: ThinkBudget = ThinkBudget()  # s1 budget forcing of the evals' completions (rollouts never)
    # What defined the task's puzzles and prompts, as the tool that built it names its flags (bin/train: curriculum,
    # seed, eval_size, ...): kept in run_config.json, and a resume with other values is refused
    # (grpo/run_files.py check_resume_layout): the data stream, the held-out sets and best/'s scores would not match.
    task_flags: dict | None = None

    def __post_init__(self):
        if not 0 <= self.level_floor < 1:
            raise ValueError(f"level_floor must be in [0, 1), got {self.level_floor}")
        if not 0 < self.promote_at <= 1:
            raise ValueError(f"promote_at must be in (0, 1], got {self.promote_at}")
        if self.promote_window < 1:
            raise ValueError(f"promote_window must be >= 1, got {self.promote_window}")


@dataclasses.dataclass
class LoopState:
    """What changes from step to step. (params, opt_state, step, position) is what a checkpoint holds."""

    params: dict  # the policy's trained tree: every param (full fine-tuning) or the adapters (LoRA)
    opt_state: Any
    step: int = 0  # GRPO steps done (rollout batches consumed); the next step is step + 1
    position: int = 0  # prompts consumed from the data stream
    bad_in_a_row: int = 0  # consecutive non-finite (skipped) steps
    level: int = 0  # the frontier: the hardest difficulty level being trained (index into task.level_names)
    recent_solved: tuple[float, ...] = ()  # sampled solved rates of the frontier's rows in its last steps (promotion)
    level_stats: tuple[LevelStats, ...] = ()  # per level: decayed sampled / solved rows (grpo/level_mix.py)
    entropy_coef: float = 0.0  # the adaptive entropy controller's coefficient (grpo/entropy_control.py)
    last_entropy: float | None = None  # the last step's measured policy entropy, nats/token
    best_step: int | None = None  # the step of the best held-out eval so far (its state is in best/)
    best_score: list[float] | None = None  # its score (grpo/best_model.py eval_score)
    guard: GuardState = dataclasses.field(default_factory=GuardState)
    lr_scale: float = 1.0  # the learning rate's factor after the guard's rollbacks
    alarm: Alarm | None = None  # a guard condition that fired and is not yet answered
    last_metrics: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What stays fixed for a run: configs, the task, the mesh, the policy's frozen tree, the compiled step and
    log-prob functions, the KL reference, I/O."""

    model_cfg: GemmaConfig
    task: Task
    grpo_cfg: GRPOConfig  # aligned with rollout_cfg (align_grpo_config)
    rollout_cfg: RolloutConfig
    train_cfg: TrainConfig
    mesh: Mesh
    policy: Policy  # what trains (grpo/policy.py); the phases only hand it (frozen, trained)
    frozen: dict  # the policy's frozen tree (LoRA: the base model; full fine-tuning: {}), read, never updated
    step_fn: Callable  # (frozen, trained, opt_state, batch) -> (trained, opt_state, metrics); trained, state donated
    logprobs_fn: Callable  # (frozen, trained, tokens, mask) -> [B, T]: the old-policy and reference passes
    # The trained tree the run started from, kept when the KL term is on: the reference policy is (frozen, reference),
    # run through the same pass as the policy (LoRA: the base under fresh b = 0 adapters, no second base copy; the
    # base alone would be compiled without the adapter path, which XLA:GPU rounds differently, so KL != 0 at start).
    reference: dict | None
    log: RunLog
    ckpt: TrainCheckpointer
    best: BestCheckpointer | None = None  # best/: the state of the best held-out eval
