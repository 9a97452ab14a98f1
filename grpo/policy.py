"""What training updates: a policy is a (frozen, trained) pair and ONE function that makes the model's weights.

    weights(frozen, trained) -> the params the forward pass reads     full fine-tuning: trained
                                                                      LoRA: base + adapters (model/lora.py)
    step(frozen, trained, opt_state, batch) -> (trained, opt_state, metrics)     grpo/step.py make_policy_step
    logprobs(frozen, trained, tokens, attention_mask) -> [B, T]                  grpo/logprobs.py make_policy_logprobs

frozen is read by every pass and never differentiated, donated or updated; trained is what the optimizer moves,
what the step donates and returns, and what a checkpoint holds beside the optimizer state.

Full fine-tuning is the policy with NOTHING frozen: frozen = {} and trained = the params. Not "LoRA with every
weight trained": the trained tree must be the params themselves, since full fine-tuning's optimizer state,
weight-decay mask (matrices, never norms) and checkpoints are per param; a full-rank adapter would double the
weights, train a different parametrisation (AdamW on a and b is not AdamW on W) and change the checkpoint
layout, so existing runs could not resume. An empty frozen tree costs nothing: jit and shard_map take {} as
an input with no leaves.

The mode is decided once, in `make_policy`. FullPolicy and LoraPolicy answer the same questions (the weights,
the merged params for sampling and export, the layouts, the optimizer, the fresh state); the step, the log-prob
passes and the training loop only ask them. A policy holds configs, not arrays: it is a static argument of jit
and a key of the loop's compile cache, while its two trees live differently (frozen: the whole run, read-only;
trained: replaced by every step).

Also here, because a policy chooses them: AdamW with its schedule and decay mask, and the placement of params,
adapters and optimizer state on the mesh per the rules table (grpo/sharding.py).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from grpo import sharding
from grpo.config import GRPOConfig
from model.config import GemmaConfig
from model.lora import (
    LoraConfig,
    abstract_adapters,
    attach,
    check_adapters,
    init_adapters,
    merge,
    validate_lora,
    with_adapters,
)
from model.params import abstract_params, check_against_schema, map_schema, param_schema


def make_schedule(grpo_cfg: GRPOConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps, or constant; counted in updates (a step with
    nothing to learn from does not advance it, grpo/step.py)."""
    if grpo_cfg.lr_schedule == "cosine":
        decay_steps = max(grpo_cfg.total_steps, grpo_cfg.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(0.0, grpo_cfg.learning_rate, grpo_cfg.warmup_steps, decay_steps)
    if grpo_cfg.warmup_steps == 0:
        return optax.constant_schedule(grpo_cfg.learning_rate)
    warmup = optax.linear_schedule(0.0, grpo_cfg.learning_rate, grpo_cfg.warmup_steps)
    return optax.join_schedules([warmup, optax.constant_schedule(grpo_cfg.learning_rate)], [grpo_cfg.warmup_steps])


def adamw(grpo_cfg: GRPOConfig, mask) -> optax.GradientTransformation:
    """grpo_cfg's AdamW, decaying the leaves where `mask` is True (None: every leaf), with the schedule injected
    so the state carries the learning rate each step used."""
    inject = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return inject(learning_rate=make_schedule(grpo_cfg), b1=grpo_cfg.adam_b1, b2=grpo_cfg.adam_b2,
                  eps=grpo_cfg.adam_eps, weight_decay=grpo_cfg.weight_decay, mask=mask)


def decay_mask(model_cfg: GemmaConfig) -> dict:
    """True for the matrices (leaves with an "embed" axis); norms are never decayed."""
    return map_schema(lambda _, s: "embed" in s.axes, model_cfg)


def make_optimizer(grpo_cfg: GRPOConfig, model_cfg: GemmaConfig) -> optax.GradientTransformation:
    """Full fine-tuning's AdamW: the matrices decayed, the norms not."""
    return adamw(grpo_cfg, decay_mask(model_cfg))


def make_lora_optimizer(grpo_cfg: GRPOConfig) -> optax.GradientTransformation:
    """LoRA's AdamW: weight decay (if any) on every adapter leaf, as PEFT + AdamW do."""
    return adamw(grpo_cfg, None)


def place_params(params: dict, model_cfg: GemmaConfig, mesh: Mesh) -> dict:
    """Params checked against the schema and laid out on the mesh per the rules table. May alias the input."""
    check_against_schema(params, param_schema(model_cfg), f"params do not match the {model_cfg.name} schema")
    return jax.device_put(params, sharding.named(mesh, sharding.param_specs(model_cfg, mesh)))


def load_on_mesh(model_dir, dtype, mesh: Mesh | None = None) -> tuple[GemmaConfig, dict]:
    """(model_cfg, params) from an HF checkpoint, each leaf put in its place on the mesh as it is read: loading
    whole onto the default device and then placing would keep a full copy on device 0 for the run."""
    import model

    if mesh is None:
        return model.load_hf_checkpoint(model_dir, dtype=dtype)
    specs = sharding.param_specs(model.load_config(model_dir), mesh)
    return model.load_hf_checkpoint(model_dir, dtype=dtype, shardings=sharding.named(mesh, specs))


def place_adapters(adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig, mesh: Mesh) -> dict:
    """Adapters checked against the LoRA schema and laid out on the mesh per the rules table."""
    check_adapters(adapters, model_cfg, lora_cfg)
    return jax.device_put(adapters, sharding.named(mesh, sharding.adapter_specs(model_cfg, lora_cfg, mesh)))


def init_opt_state(tx: optax.GradientTransformation, trained: dict, specs: dict, mesh: Mesh):
    """tx's fresh state for `trained` (params or adapters), each moment laid out like its leaf (`specs`)."""
    return _placed_init(tx, trained, specs, mesh)(trained)


def _placed_init(tx: optax.GradientTransformation, trained: dict, specs: dict, mesh: Mesh):
    state_specs = sharding.opt_state_specs(jax.eval_shape(tx.init, trained), specs)
    return jax.jit(tx.init, out_shardings=sharding.named(mesh, state_specs))


class Policy(Protocol):
    """The one interface of a fine-tuning mode. Trees are plain nested dicts; specs are PartitionSpec trees."""

    model_cfg: GemmaConfig

    def weights(self, frozen: dict, trained: dict) -> dict:
        """The params the forward pass reads: whole arrays or, inside shard_map, local shards alike."""

    def merged(self, frozen: dict, trained: dict) -> dict:
        """Plain params (model/params.py schema) for the sampler and the HF export."""

    def frozen_specs(self, mesh: Mesh) -> dict: ...

    def trained_specs(self, mesh: Mesh) -> dict: ...

    def weight_specs(self, mesh: Mesh) -> dict:
        """The layout of weights(frozen, trained)."""

    def optimizer(self, grpo_cfg: GRPOConfig) -> optax.GradientTransformation: ...

    def start(self, params: dict, key: jax.Array, mesh: Mesh) -> tuple[dict, dict]:
        """(frozen, trained) on the mesh for a run starting from the model `params` (drawing fresh trained
        leaves from `key` where the mode has any)."""

    def abstract(self, param_dtype) -> tuple[dict, dict]:
        """(frozen, trained) as jax.ShapeDtypeStructs, the params in param_dtype."""

    def config_json(self) -> dict | None:
        """run_config.json's "lora" entry (bin/train compares it before resuming)."""


@dataclasses.dataclass(frozen=True)
class FullPolicy:
    """Full fine-tuning: nothing frozen ({}), every param trained."""

    model_cfg: GemmaConfig

    def weights(self, frozen: dict, trained: dict) -> dict:
        return trained

    def merged(self, frozen: dict, trained: dict) -> dict:
        return trained

    def frozen_specs(self, mesh: Mesh) -> dict:
        return {}

    def trained_specs(self, mesh: Mesh) -> dict:
        return sharding.param_specs(self.model_cfg, mesh)

    def weight_specs(self, mesh: Mesh) -> dict:
        return self.trained_specs(mesh)

    def optimizer(self, grpo_cfg: GRPOConfig) -> optax.GradientTransformation:
        return make_optimizer(grpo_cfg, self.model_cfg)

    def start(self, params: dict, key: jax.Array | None, mesh: Mesh) -> tuple[dict, dict]:
        return {}, place_params(params, self.model_cfg, mesh)

    def abstract(self, param_dtype=jnp.float32) -> tuple[dict, dict]:
        return {}, abstract_params(self.model_cfg, param_dtype)

    def config_json(self) -> dict | None:
        return None


@dataclasses.dataclass(frozen=True)
class LoraPolicy:
    """LoRA: the base params frozen, low-rank adapters trained (AdamW's moments are adapter-shaped; weight decay,
    if any, on every adapter leaf, as PEFT + AdamW do). Fresh adapters have b = 0: the policy starts exactly at
    the base model."""

    model_cfg: GemmaConfig
    lora_cfg: LoraConfig

    def __post_init__(self):
        validate_lora(self.lora_cfg, self.model_cfg)
        if self.lora_cfg.rank == 0:
            raise ValueError("LoRA needs --lora_rank > 0; rank 0 is full fine-tuning (make_policy gives FullPolicy)")

    def weights(self, frozen: dict, trained: dict) -> dict:
        return with_adapters(frozen, trained, self.lora_cfg)

    def merged(self, frozen: dict, trained: dict) -> dict:
        return merge(frozen, trained, self.model_cfg, self.lora_cfg)

    def frozen_specs(self, mesh: Mesh) -> dict:
        return sharding.param_specs(self.model_cfg, mesh)

    def trained_specs(self, mesh: Mesh) -> dict:
        return sharding.adapter_specs(self.model_cfg, self.lora_cfg, mesh)

    def weight_specs(self, mesh: Mesh) -> dict:
        return attach(self.frozen_specs(mesh), self.trained_specs(mesh))  # base layers + adapters under "lora"

    def optimizer(self, grpo_cfg: GRPOConfig) -> optax.GradientTransformation:
        return make_lora_optimizer(grpo_cfg)

    def start(self, params: dict, key: jax.Array, mesh: Mesh) -> tuple[dict, dict]:
        adapters = init_adapters(key, self.model_cfg, self.lora_cfg)
        return (place_params(params, self.model_cfg, mesh),
                place_adapters(adapters, self.model_cfg, self.lora_cfg, mesh))

    def abstract(self, param_dtype=jnp.float32) -> tuple[dict, dict]:
        # float32 adapters whatever the base's dtype: they are the trained weights
        return abstract_params(self.model_cfg, param_dtype), abstract_adapters(self.model_cfg, self.lora_cfg)

    def config_json(self) -> dict | None:
        return dataclasses.asdict(self.lora_cfg)


def make_policy(model_cfg: GemmaConfig, lora_cfg: LoraConfig | None = None) -> FullPolicy | LoraPolicy:
    """The one place the fine-tuning mode is decided: LoRA for a LoraConfig of rank > 0, else full fine-tuning."""
    if lora_cfg is None or lora_cfg.rank == 0:
        return FullPolicy(model_cfg)
    return LoraPolicy(model_cfg, lora_cfg)


def init_trained_state(policy: Policy, trained: dict, grpo_cfg: GRPOConfig, mesh: Mesh):
    """A fresh optimizer state for the placed `trained` tree, laid out to match it."""
    return init_opt_state(policy.optimizer(grpo_cfg), trained, policy.trained_specs(mesh), mesh)


def abstract_trained_state(policy: Policy, trained: dict, grpo_cfg: GRPOConfig, mesh: Mesh):
    """init_trained_state's shapes, dtypes and shardings, nothing allocated: a resume restores into these instead
    of holding a fresh optimizer state beside the restored one."""
    return jax.eval_shape(_placed_init(policy.optimizer(grpo_cfg), trained, policy.trained_specs(mesh), mesh), trained)


def init_policy_state(policy: Policy, params: dict, key: jax.Array | None, grpo_cfg: GRPOConfig,
                      mesh: Mesh) -> tuple[dict, dict, object]:
    """(frozen, trained, opt_state) on the mesh for a run starting from the model `params`; `key` draws LoRA's
    fresh adapters (full fine-tuning ignores it).

    trained may share buffers with `params` and the step donates it: treat `params` as consumed (a LoRA
    base is only read, so the caller's params stay valid there).
    """
    frozen, trained = policy.start(params, key, mesh)
    return frozen, trained, init_trained_state(policy, trained, grpo_cfg, mesh)


def init_train_state(params: dict, model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh) -> tuple[dict, object]:
    """Full fine-tuning's (params, opt_state) on the mesh: init_policy_state of FullPolicy without its empty
    frozen tree. The step donates both: keep using the returned params."""
    _, params, opt_state = init_policy_state(FullPolicy(model_cfg), params, None, grpo_cfg, mesh)
    return params, opt_state


def init_lora_state(adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig, grpo_cfg: GRPOConfig,
                    mesh: Mesh) -> tuple[dict, object]:
    """LoRA's (adapters, opt_state) on the mesh for GIVEN adapters (tests; the loop draws fresh ones through
    init_policy_state). The step donates both: keep using the returned adapters. Place the base with place_params.
    """
    adapters = place_adapters(adapters, model_cfg, lora_cfg, mesh)
    return adapters, init_trained_state(LoraPolicy(model_cfg, lora_cfg), adapters, grpo_cfg, mesh)
