"""The GRPO step for LoRA: only the adapters train; the base params are a frozen, shared input.

    step(adapters, opt_state, batch, base_params) -> (adapters, opt_state, metrics)

Same body as grpo/step.py (`sharded_step`: micro-batch scan, the pcast gradient trap, one psum, clip, AdamW,
NaN guard) with the adapters as the trained tree. The base params are laid out as for full fine-tuning,
read by the loss (attached to the adapters, model/lora.py `with_adapters`) but neither differentiated nor
donated: the same buffers serve the next step, the reference log-probs and sampling. AdamW's state holds
the adapters' moments only (3 x 4 bytes per adapter weight, not per model weight), and there is no
[V, D] or per-layer weight gradient at all; what the backward pass still needs is the activation gradient
through every layer.

The KL reference with LoRA is the base model itself: `make_sharded_logprobs(model_cfg, mesh, ...)` on the base
params, no second copy. The old policy (num_iterations > 1) is base + adapters:
`make_sharded_logprobs(..., lora_cfg=lora_cfg)` taking (base, adapters, tokens, mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from grpo import sharding
from grpo.config import GRPOConfig
from grpo.step import adamw, init_opt_state, make_optimizer, make_step, policy_loss_on, sharded_step
from model.config import GemmaConfig
from model.lora import LoraConfig, attach, check_adapters, validate_lora, with_adapters


def make_lora_optimizer(grpo_cfg: GRPOConfig) -> optax.GradientTransformation:
    """grpo_cfg's AdamW over the adapters; weight decay (if any) on every adapter leaf, as PEFT + AdamW do."""
    return adamw(grpo_cfg, None)


def place_adapters(adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig, mesh: Mesh) -> dict:
    """Adapters checked against the LoRA schema and laid out on the mesh per the rules table."""
    check_adapters(adapters, model_cfg, lora_cfg)
    return jax.device_put(adapters, sharding.named(mesh, sharding.adapter_specs(model_cfg, lora_cfg, mesh)))


def init_lora_state(adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig, grpo_cfg: GRPOConfig,
                    mesh: Mesh) -> tuple[dict, object]:
    """Adapters placed on the mesh and a fresh optimizer state (adapter-shaped moments) laid out to match.

    The step donates both: keep using the returned adapters. Place the base params with grpo.place_params.
    """
    validate_lora(lora_cfg, model_cfg)
    adapters = place_adapters(adapters, model_cfg, lora_cfg, mesh)
    specs = sharding.adapter_specs(model_cfg, lora_cfg, mesh)
    return adapters, init_opt_state(make_lora_optimizer(grpo_cfg), adapters, specs, mesh)


def make_lora_step(model_cfg: GemmaConfig, lora_cfg: LoraConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *,
                   compiler_options: dict | None = None):
    """The jitted step(adapters, opt_state, batch, base_params) -> (adapters, opt_state, metrics).

    adapters and opt_state are donated; base_params (laid out as grpo.param_specs says) are only read.
    """
    validate_lora(lora_cfg, model_cfg)
    if lora_cfg.rank == 0:
        raise ValueError("make_lora_step needs --lora_rank > 0; rank 0 is full fine-tuning (grpo.make_step)")
    specs = sharding.adapter_specs(model_cfg, lora_cfg, mesh)
    base_specs = sharding.param_specs(model_cfg, mesh)
    weight_specs = attach(base_specs, specs)  # what the forward pass sees: base layers + adapters under "lora"

    def loss_of(adapters, frozen, mb, num_tokens, num_rows):
        (base,) = frozen
        return policy_loss_on(with_adapters(base, adapters, lora_cfg), mb, num_tokens, num_rows,
                              model_cfg=model_cfg, grpo_cfg=grpo_cfg, specs=weight_specs)

    step = sharded_step(loss_of, specs, (base_specs,), make_lora_optimizer(grpo_cfg), grpo_cfg, mesh)
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)


def make_any_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, lora_cfg: LoraConfig | None = None,
                  **kwargs):
    """make_step (lora_cfg None: full fine-tuning) or make_lora_step: the step bin/train would run."""
    if lora_cfg is None:
        return make_step(model_cfg, grpo_cfg, mesh, **kwargs)
    return make_lora_step(model_cfg, lora_cfg, grpo_cfg, mesh, **kwargs)


def abstract_step_args(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, rows: int, length: int, *,
                       lora_cfg: LoraConfig | None = None, param_dtype=jnp.float32,
                       optional_keys: tuple[str, ...] = ()) -> tuple:
    """make_any_step's arguments as shapes laid out on the mesh (jax.ShapeDtypeStruct with shardings), to lower,
    compile and memory-analyse a step before any weight exists: (params, opt_state, batch), or with LoRA
    (adapters, opt_state, batch, params). The batch is [rows, length] plus optional_keys (old_logprobs,
    ref_logprobs, truncated)."""
    from model.lora import abstract_adapters
    from model.params import abstract_params

    shaped = lambda tree, specs: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, s)), tree, specs)
    specs = sharding.param_specs(model_cfg, mesh)
    params = shaped(abstract_params(model_cfg, param_dtype), specs)
    if lora_cfg is None:
        trained, trained_specs, tx = params, specs, make_optimizer(grpo_cfg, model_cfg)
    else:  # float32 adapters whatever the base's dtype: they are the trained weights
        trained_specs = sharding.adapter_specs(model_cfg, lora_cfg, mesh)
        trained, tx = shaped(abstract_adapters(model_cfg, lora_cfg), trained_specs), make_lora_optimizer(grpo_cfg)
    state = jax.eval_shape(tx.init, trained)
    state = shaped(state, sharding.opt_state_specs(state, trained_specs))
    row = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(
        mesh, sharding.batch_spec(len(shape))))
    batch = {"tokens": row(jnp.int32, rows, length), "attention_mask": row(jnp.int32, rows, length),
             "completion_mask": row(jnp.int32, rows, length), "advantages": row(jnp.float32, rows)}
    for key in optional_keys:
        if key in ("truncated", "entropy_coef"):  # [B]
            batch[key] = row(jnp.bool_ if key == "truncated" else jnp.float32, rows)
        else:
            batch[key] = row(jnp.float32, rows, length)
    return (trained, state, batch) if lora_cfg is None else (trained, state, batch, params)
