"""GRPO for Gemma in pure JAX: advantages, the clipped objective, and one sharded, jitted training step."""

from grpo.advantages import compute_advantages
from grpo.config import GRPOConfig
from grpo.logprobs import (
    logprobs,
    make_policy_logprobs,
    make_sharded_logprobs,
    make_step_logprobs,
    step_settings,
    token_logprobs,
)
from grpo.loss import aggregate, grpo_loss, per_token_loss, policy_loss, training_mask
from grpo.policy import (
    FullPolicy,
    LoraPolicy,
    Policy,
    init_lora_state,
    init_policy_state,
    init_train_state,
    make_lora_optimizer,
    make_optimizer,
    make_policy,
    make_schedule,
    place_adapters,
    place_params,
)
from grpo.sharding import RULES, adapter_specs, make_mesh, opt_state_specs, param_specs
from grpo.step import (
    abstract_step_args,
    abstract_step_inputs,
    make_any_step,
    make_lora_step,
    make_policy_step,
    make_step,
)

__all__ = [
    "RULES", "FullPolicy", "GRPOConfig", "LoraPolicy", "Policy", "abstract_step_args", "abstract_step_inputs",
    "adapter_specs", "aggregate", "compute_advantages", "grpo_loss", "init_lora_state", "init_policy_state",
    "init_train_state", "logprobs", "make_any_step", "make_lora_optimizer", "make_lora_step", "make_mesh",
    "make_optimizer", "make_policy", "make_policy_logprobs", "make_policy_step", "make_schedule",
    "make_sharded_logprobs", "make_step", "make_step_logprobs", "opt_state_specs", "param_specs", "per_token_loss",
    "place_adapters", "place_params", "policy_loss", "step_settings", "token_logprobs", "training_mask",
]
