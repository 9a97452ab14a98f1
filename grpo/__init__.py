"""GRPO for Gemma in pure JAX: advantages, the clipped objective, and one sharded, jitted training step."""

from grpo.advantages import compute_advantages
from grpo.config import GRPOConfig
from grpo.logprobs import logprobs, make_sharded_logprobs, make_step_logprobs, token_logprobs
from grpo.lora_step import (
    abstract_step_args,
    init_lora_state,
    make_any_step,
    make_lora_optimizer,
    make_lora_step,
    place_adapters,
)
from grpo.loss import aggregate, grpo_loss, per_token_loss, policy_loss, training_mask
from grpo.sharding import RULES, adapter_specs, make_mesh, opt_state_specs, param_specs
from grpo.step import init_train_state, make_optimizer, make_schedule, make_step, place_params

__all__ = [
    "RULES", "GRPOConfig", "abstract_step_args", "adapter_specs", "aggregate", "compute_advantages", "grpo_loss",
    "init_lora_state", "init_train_state", "logprobs", "make_any_step", "make_lora_optimizer", "make_lora_step",
    "make_mesh", "make_optimizer", "make_schedule", "make_sharded_logprobs", "make_step", "make_step_logprobs",
    "opt_state_specs", "param_specs", "per_token_loss", "place_adapters", "place_params", "policy_loss",
    "token_logprobs", "training_mask",
]
