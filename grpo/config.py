"""GRPOConfig: every knob of the GRPO objective and of the optimizer step, in one frozen dataclass.

Names follow TRL's GRPOTrainer (https://huggingface.co/docs/trl/main/en/grpo_trainer), Tunix and EasyDeL so
users recognise them. The config is hashable, so it can be closed over by (or passed statically into) jitted
functions. Three fields describe the rollout rather than the objective (temperature, max_completion_length,
logprob_tail); the training loop derives them from its RolloutConfig (grpo.rollout.align_grpo_config), so
they cannot drift apart from what the sampler did.
"""

from __future__ import annotations

import dataclasses
import math

from grpo.entropy_control import EntropyControl

LOSS_TYPES = ("token_mean", "sequence_mean", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULES = ("cosine", "constant")
# With LoRA and no explicit learning rate: this many times the full-fine-tuning rate, the usual ratio for LoRA
# (e.g. Schulman et al., "LoRA Without Regret", 2025: https://thinkingmachines.ai/blog/lora/).
LORA_LR_SCALE = 10.0


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The GRPO objective (advantages, clipped ratio, KL, aggregation) and the optimizer around it."""

    # --- rollout shape and advantages ---
    num_generations: int = 8  # G completions per prompt; B = P * G rows
    scale_rewards: str = "group"  # divide (r - group mean) by the group std, the batch std, or nothing
    mask_truncated_completions: bool = False  # rows flagged batch["truncated"] get no loss (DAPO)
    max_completion_length: int | None = None  # the dr_grpo denominator; required for it
    # logits / temperature, as the sampler used, so ratios compare like with like. Over the whole vocabulary even
    # when rollouts cut it with top-k / top-p (as TRL and verl do): the loss sees the untruncated policy.
    temperature: float = 1.0
    # --- objective ---
    beta: float = 0.0  # k3 KL coefficient; 0 skips the reference forward entirely
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.28  # ... and above at 1 + epsilon_high (DAPO's "clip higher"; TinyZero: 0.2)
    loss_type: str = "token_mean"
    num_iterations: int = 1  # mu: optimizer steps per rollout batch (the loop calls step mu times)
    # Entropy bonus (verl's entropy_coeff, default 0.001 there): loss -= coef * the loss_type's mean of each
    # completion token's policy entropy, against entropy collapse. Needs fused_unembed (it makes the gradient).
    entropy_coef: float = 0.0
    # An adaptive entropy bonus instead (grpo/entropy_control.py): a coefficient the training loop raises while the
    # policy's entropy is below a target and applies only there; it reaches the step as batch["entropy_coef"].
    entropy_control: EntropyControl | None = EntropyControl()
    # --- optimizer ---
    learning_rate: float = 1e-5  # full fine-tuning's; LoRA's default is LORA_LR_SCALE times it
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    total_steps: int = 1000  # length of the cosine schedule (warmup included)
    weight_decay: float = 0.0  # decoupled (AdamW); matrices only, never norms
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # global-norm clip; None disables
    # --- memory ---
    num_micro_batches: int = 1  # gradient accumulation: the per-device batch is scanned in this many pieces
    remat: bool = True  # recompute each layer's activations in the backward pass (less memory, more FLOPs)
    # Cast the weights to this dtype for the forward and backward ("bfloat16": float32 master weights stay
    # in params and Adam, compute and all-gathers run in bf16). None computes in the params' own dtype.
    compute_dtype: str | None = None
    logits_chunk: int = 256  # tokens per unembedding chunk: [rows, chunk, V] logits live at a time
    # The loss's gradient through the unembedding made in the forward pass (grpo/fused_unembed.py): 3 vocabulary
    # matmuls instead of 4. False: autodiff through checkpointed chunks (the reference path; same math).
    fused_unembed: bool = True
    # Log-probs only for the last N positions of each row (None: all). The training loop puts every completion
    # there (prompt left-padded, completion after it) and sets N = max_new_tokens: the 262k-vocab unembedding
    # is then not spent on prompt tokens. Completion tokens before the tail get no loss.
    logprob_tail: int | None = None
    # Run each group's prompt once in the step and the old / reference log-prob passes (model/shared_prompt.py):
    # the batch's rows are groups of num_generations consecutive rows with identical columns before the tail
    # (what the training loop builds; it checks). Same numbers, fewer layer FLOPs (model/shared_prompt.py;
    # BUILD.md measures it). Applies when each device's micro-batch holds whole groups and logprob_tail is set.
    shared_prompt: bool = True

    def __post_init__(self):
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("num_generations", "num_iterations", "num_micro_batches", "logits_chunk", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("beta", "entropy_coef", "epsilon_low", "epsilon_high", "weight_decay", "learning_rate",
                     "warmup_steps", "adam_eps"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too: it would skip every step as non-finite
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.compute_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be None, 'bfloat16' or 'float32', got {self.compute_dtype!r}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.logprob_tail is not None and self.logprob_tail < 1:
            raise ValueError(f"logprob_tail must be >= 1 or None, got {self.logprob_tail}")
        if self.entropy_coef and not self.fused_unembed:
            raise ValueError("entropy_coef > 0 needs fused_unembed=True (the fused path makes the entropy's gradient)")
        if self.entropy_control and not self.fused_unembed:
            raise ValueError("entropy_control needs fused_unembed=True (the fused path makes the entropy's gradient)")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type='dr_grpo' divides by max_completion_length; set it (got None)")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
