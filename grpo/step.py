"""One jitted GRPO step: forward, loss, backward, micro-batch accumulation, clip, AdamW, NaN guard.

The body runs under `jax.shard_map`; every collective is written here, in grpo/fsdp_forward.py (the forward
pass) or in grpo/sharding.py:

    device (d, f) of the data x fsdp mesh holds
      params     every matrix 1/fsdp (embedding: vocab rows; others: along D), the same on all d; norms whole
      opt state  Adam mu / nu shaped and split like their param; count and lr whole
      batch      rows [(d * fsdp + f) * b, ... + b) of every batch array, b = B / (data * fsdp)

    for each of M micro-batches (lax.scan over [M, b / M, T] slices):
      lookup     tokens all_gathered over fsdp, looked up in the LOCAL vocab rows, psum_scatter back
      embed      all_gather over fsdp -> [V, D] for the chunked unembedding (reduce-scattered in backward)
      layer l    all_gather over fsdp of layer l's q/k/v/o/gate/up/down inside the layer scan;
                 not saved for the backward pass: re-gathered there (and with remat, the layer re-run)
      backward   the transpose of each all_gather is a psum_scatter over fsdp: each device gets the
                 gradient of ITS shard, summed over the rows of all fsdp peers
      accumulate float32 gradient shards
    psum over data (over data AND fsdp for whole leaves such as norms): the gradient of the full batch
    psum over fsdp of each shard's squared norm -> global grad norm -> clip -> AdamW on the local shards
    psum over (data, fsdp) of metric shares and of the completion-token count

The shard_map gradient trap (https://docs.jax.dev/en/latest/notebooks/shard_map.html, "varying" values):
with check_vma=True, the gradient of a param that is replicated over an axis comes back already summed over
that axis, so a second psum would count it `axis size` times. We make the sum explicit instead: params are
`pcast` to varying over their replicated axes BEFORE differentiation, so the gradients are per-device
partial sums, and the psum above is the one and only reduction.

The step is written once for every fine-tuning mode (grpo/policy.py): step(frozen, trained, opt_state, batch)
differentiates the loss of policy.weights(frozen, trained) with respect to `trained` only (full fine-tuning: the
params, frozen = {}; LoRA: the adapters, the base params frozen). frozen is laid out as the policy says, read by
the loss, and neither differentiated nor donated: the same buffers serve the next step, the log-prob passes and
sampling. AdamW's state holds the trained leaves' moments only.

A step whose loss or gradient norm is not finite is not applied: params and optimizer state come back
unchanged and metrics["skipped"] is 1. Nor is a step with no token to learn from (num_completion_tokens 0: every
row masked out), so the learning-rate schedule counts updates, not steps.

make_step (full fine-tuning: step(params, opt_state, batch)), make_lora_step (step(adapters, opt_state, batch,
base)), make_any_step and abstract_step_args are the per-mode argument orders from before the policy interface,
thin wrappers kept for the tests that call them; the loop, the planner, bin/inspect and the benchmarks use
make_policy_step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from grpo import loss as objective
from grpo import sharding
from grpo.config import GRPOConfig
from grpo.fsdp_forward import check_rows, fsdp_hidden_states, pad_columns
from grpo.fused_unembed import fused_token_loss
from grpo.logprobs import sharded_token_logprobs, sharing_group
from grpo.policy import FullPolicy, LoraPolicy, Policy, make_policy
from model.config import GemmaConfig
from model.lora import LoraConfig

# [B]; "entropy_coef": the entropy bonus per row, as data so an adaptive coefficient never recompiles
ROW_KEYS = ("advantages", "truncated", "entropy_coef")
TOKEN_KEYS = ("tokens", "attention_mask", "completion_mask", "old_logprobs", "ref_logprobs")  # [B, T]
REQUIRED_KEYS = ("tokens", "attention_mask", "completion_mask", "advantages")


def make_policy_step(policy: Policy, grpo_cfg: GRPOConfig, mesh: Mesh, *, compiler_options: dict | None = None):
    """The jitted step(frozen, trained, opt_state, batch) -> (trained, opt_state, metrics) of any fine-tuning mode.

    trained and opt_state are donated (keep using the returned ones); frozen is only read. compiler_options go
    to XLA as they are (e.g. TPU scheduler flags; tests use optimization level 0).
    """
    return jax.jit(sharded_step(policy, grpo_cfg, mesh), donate_argnums=(1, 2), compiler_options=compiler_options)


def make_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *, compiler_options: dict | None = None):
    """Full fine-tuning's step(params, opt_state, batch) -> (params, opt_state, metrics): make_policy_step of
    FullPolicy with its empty frozen tree left out. params and opt_state donated."""
    step = sharded_step(FullPolicy(model_cfg), grpo_cfg, mesh)
    return jax.jit(lambda params, opt_state, batch: step({}, params, opt_state, batch), donate_argnums=(0, 1),
                   compiler_options=compiler_options)


def make_lora_step(model_cfg: GemmaConfig, lora_cfg: LoraConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *,
                   compiler_options: dict | None = None):
    """LoRA's step(adapters, opt_state, batch, base_params) -> (adapters, opt_state, metrics): make_policy_step of
    LoraPolicy in the adapters-first order from before the policy interface (tests). adapters and opt_state are
    donated; base_params (laid out as grpo.param_specs says) are only read."""
    step = sharded_step(LoraPolicy(model_cfg, lora_cfg), grpo_cfg, mesh)
    return jax.jit(lambda adapters, opt_state, batch, base: step(base, adapters, opt_state, batch),
                   donate_argnums=(0, 1), compiler_options=compiler_options)


def make_any_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, lora_cfg: LoraConfig | None = None,
                  **kwargs):
    """make_step (no LoRA) or make_lora_step, in the argument order of abstract_step_args. New code:
    make_policy_step(make_policy(model_cfg, lora_cfg), ...)."""
    if lora_cfg is None:
        return make_step(model_cfg, grpo_cfg, mesh, **kwargs)
    return make_lora_step(model_cfg, lora_cfg, grpo_cfg, mesh, **kwargs)


def abstract_step_args(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, rows: int, length: int, *,
                       lora_cfg: LoraConfig | None = None, param_dtype=jnp.float32,
                       optional_keys: tuple[str, ...] = ()) -> tuple:
    """make_any_step's arguments as shapes on the mesh (abstract_step_inputs in make_any_step's order):
    (params, opt_state, batch), or with LoRA (adapters, opt_state, batch, params)."""
    frozen, trained, state, batch = abstract_step_inputs(make_policy(model_cfg, lora_cfg), grpo_cfg, mesh, rows,
                                                         length, param_dtype=param_dtype, optional_keys=optional_keys)
    return (trained, state, batch) if lora_cfg is None else (trained, state, batch, frozen)


def abstract_step_inputs(policy: Policy, grpo_cfg: GRPOConfig, mesh: Mesh, rows: int, length: int, *,
                         param_dtype=jnp.float32, optional_keys: tuple[str, ...] = ()) -> tuple:
    """make_policy_step's arguments (frozen, trained, opt_state, batch) as jax.ShapeDtypeStructs laid out on the
    mesh, to lower, compile and memory-analyse a step before any weight exists. The batch is [rows, length] plus
    optional_keys (old_logprobs, ref_logprobs, truncated, entropy_coef)."""
    shaped = lambda tree, specs: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, s)), tree, specs)
    frozen, trained = policy.abstract(param_dtype)
    specs = policy.trained_specs(mesh)
    frozen, trained = shaped(frozen, policy.frozen_specs(mesh)), shaped(trained, specs)
    state = jax.eval_shape(policy.optimizer(grpo_cfg).init, trained)
    state = shaped(state, sharding.opt_state_specs(state, specs))
    row = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(
        mesh, sharding.batch_spec(len(shape))))
    batch = {"tokens": row(jnp.int32, rows, length), "attention_mask": row(jnp.int32, rows, length),
             "completion_mask": row(jnp.int32, rows, length), "advantages": row(jnp.float32, rows)}
    for key in optional_keys:
        if key in ROW_KEYS:  # [B]
            batch[key] = row(jnp.bool_ if key == "truncated" else jnp.float32, rows)
        else:
            batch[key] = row(jnp.float32, rows, length)
    return frozen, trained, state, batch


def policy_loss_on(weights: dict, mb: dict, num_tokens: jax.Array, num_rows: int, *, model_cfg: GemmaConfig,
                   grpo_cfg: GRPOConfig, specs: dict) -> tuple[jax.Array, dict]:
    """Inside shard_map: (loss, metric shares) of one micro-batch under the local shards of `weights`
    (params, or params with adapters attached), laid out as `specs`."""
    w = objective.compute_params(weights, grpo_cfg)
    if not grpo_cfg.fused_unembed:
        logp, ent = sharded_token_logprobs(w, mb["tokens"], mb["attention_mask"], model_cfg, specs,
                                           chunk=grpo_cfg.logits_chunk, temperature=grpo_cfg.temperature,
                                           tail=grpo_cfg.logprob_tail, remat=grpo_cfg.remat,
                                           group=sharing_group(grpo_cfg))
        return objective.policy_loss(logp, ent, mb, mb["mask"], grpo_cfg, num_tokens, num_rows)
    # The same loss with its gradient through the unembedding made in the forward pass (grpo/fused_unembed.py);
    # logp and ent come back without gradients and only feed the metrics. With shared prompts h holds the
    # columns from col on (model/shared_prompt.py), and the per-token inputs are cut to match.
    h, col = fsdp_hidden_states(w, mb["tokens"], mb["attention_mask"], model_cfg, specs, remat=grpo_cfg.remat,
                                group=sharing_group(grpo_cfg), tail=grpo_cfg.logprob_tail)
    embed = sharding.gather(w["embed"], specs["embed"])  # [V, D]
    aux = {k: v[:, col:] for k, v in objective.fused_aux(mb, mb["mask"], grpo_cfg, num_tokens, num_rows).items()}
    loss, logp, ent = fused_token_loss(h, embed, mb["tokens"][:, col:], aux,
                                       objective.token_loss_fn(grpo_cfg, "old" in aux), model_cfg,
                                       chunk=grpo_cfg.logits_chunk, temperature=grpo_cfg.temperature,
                                       tail=grpo_cfg.logprob_tail)
    logp, ent = pad_columns(logp, col), pad_columns(ent, col)
    _, shares = objective.policy_loss(logp, ent, mb, mb["mask"], grpo_cfg, num_tokens, num_rows)
    return loss, shares


def sharded_step(policy: Policy, grpo_cfg: GRPOConfig, mesh: Mesh) -> Callable:
    """The unjitted step(frozen, trained, opt_state, batch) -> (trained, opt_state, metrics) under shard_map.

    trained: the tree the optimizer updates, laid out as policy.trained_specs; frozen: what the loss reads but
    never differentiates, laid out as policy.frozen_specs. The loss runs on the local shards of
    policy.weights(frozen, trained).
    """
    specs, frozen_specs, weight_specs = policy.trained_specs(mesh), policy.frozen_specs(mesh), policy.weight_specs(mesh)
    tx = policy.optimizer(grpo_cfg)

    def loss_of(frozen, trained, mb, num_tokens, num_rows):
        return policy_loss_on(policy.weights(frozen, trained), mb, num_tokens, num_rows, model_cfg=policy.model_cfg,
                              grpo_cfg=grpo_cfg, specs=weight_specs)

    def step(frozen, trained, opt_state, batch):
        batch = _prepare_batch(batch, grpo_cfg, mesh)
        state_specs = sharding.opt_state_specs(opt_state, specs)
        batch_specs = {k: sharding.batch_spec(v.ndim) for k, v in batch.items()}
        body = functools.partial(_step_body, loss_of=loss_of, grpo_cfg=grpo_cfg, specs=specs, tx=tx,
                                 num_rows=batch["tokens"].shape[0])
        # in: frozen and trained leaves and the state per the rules table, batch split by rows; out: the trained
        # layouts, and metrics replicated (psummed inside: every device holds the same).
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(frozen_specs, specs, state_specs, batch_specs),
                               out_specs=(specs, state_specs, P()), check_vma=True)
        return mapped(frozen, trained, opt_state, batch)

    return step


def _step_body(frozen, trained, opt_state, batch, *, loss_of, grpo_cfg, specs, tx, num_rows):
    mask = objective.training_mask(batch, grpo_cfg)
    num_tokens = jax.lax.psum(jnp.sum(mask), sharding.BATCH_AXES)
    grads, shares = _accumulate_grads(trained, frozen, {**batch, "mask": mask}, num_tokens, loss_of, grpo_cfg,
                                      specs, num_rows)
    # The one gradient reduction: over the axes each leaf is replicated on (see the trap above).
    grads = jax.tree.map(lambda g, s: jax.lax.psum(g, sharding.replicated_axes(s)), grads, specs)
    shares = jax.lax.psum(shares, sharding.BATCH_AXES)
    grad_norm = _global_norm(grads, specs)
    if grpo_cfg.max_grad_norm is not None:  # same rule as optax.clip_by_global_norm
        grads = jax.tree.map(
            lambda g: jnp.where(grad_norm < grpo_cfg.max_grad_norm, g, g / grad_norm * grpo_cfg.max_grad_norm), grads)
    updates, new_state = tx.update(grads, opt_state, trained)
    new_trained = optax.apply_updates(trained, updates)
    new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, opt_state)  # a stable signature
    finite = jnp.isfinite(shares["loss"]) & jnp.isfinite(grad_norm)
    # No token to learn from (every group without signal, masked out): no update at all. AdamW would still move
    # the weights by its momentum and the weight decay, and advance the schedule, on a zero gradient.
    ok = finite & (num_tokens > 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {**shares, "grad_norm": grad_norm, "learning_rate": new_state.hyperparams["learning_rate"],
               "num_completion_tokens": num_tokens, "skipped": 1.0 - finite.astype(jnp.float32)}
    return keep(new_trained, trained), keep(new_state, opt_state), metrics


def _accumulate_grads(trained, frozen, batch, num_tokens, loss_of, grpo_cfg, specs, num_rows):
    """Per-device partial gradients (float32 shards) summed over the micro-batches, and metric shares."""
    m = grpo_cfg.num_micro_batches
    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)  # [M, b / M, ...]
    varying = jax.tree.map(lambda w, s: jax.lax.pcast(w, sharding.replicated_axes(s), to="varying"), trained, specs)

    def one(acc, mb):
        loss_fn = lambda t: loss_of(frozen, t, mb, num_tokens, num_rows)
        (_, shares), g = jax.value_and_grad(loss_fn, has_aux=True)(varying)
        return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g), shares

    acc = jax.tree.map(lambda w: jnp.zeros_like(w, jnp.float32), varying)
    with jax.named_scope("micro_batches"):
        grads, shares = jax.lax.scan(one, acc, micro)
    return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), shares)


def _global_norm(grads, specs) -> jax.Array:
    """sqrt of the sum of squares over the FULL gradient: shard sums are psummed over their split axes."""
    def sq(g, s):
        return jax.lax.psum(jnp.sum(jnp.square(g.astype(jnp.float32))), sharding.sharded_axes(s))

    return jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(sq, grads, specs))))


def _prepare_batch(batch: dict, grpo_cfg: GRPOConfig, mesh: Mesh) -> dict:
    """Check keys and shapes at trace time (a clear error, not one deep inside shard_map) and cast dtypes."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    unexpected = sorted(set(batch) - set(ROW_KEYS) - set(TOKEN_KEYS))
    if missing or unexpected:
        raise ValueError(f"batch keys: missing {missing}, unexpected {unexpected}; "
                         f"expected {list(REQUIRED_KEYS)} + optional old_logprobs, ref_logprobs, truncated, "
                         "entropy_coef")
    if "entropy_coef" in batch and not grpo_cfg.fused_unembed:
        raise ValueError("batch['entropy_coef'] needs fused_unembed=True (the fused path makes the entropy's gradient)")
    if grpo_cfg.beta and "ref_logprobs" not in batch:
        raise ValueError(f"beta={grpo_cfg.beta} needs batch['ref_logprobs']; it is missing")
    rows, length = jnp.shape(batch["tokens"]) if jnp.ndim(batch["tokens"]) == 2 else (None, None)
    if rows is None or length < 2:
        raise ValueError(f"batch['tokens'] must be [B, T] with T >= 2, got shape {jnp.shape(batch['tokens'])}")
    for k, v in batch.items():
        want = (rows,) if k in ROW_KEYS else (rows, length)
        if jnp.shape(v) != want:
            raise ValueError(f"batch[{k!r}] must have shape {want}, got {jnp.shape(v)}")
    check_rows(rows, mesh, grpo_cfg.num_micro_batches, "step")
    dtypes = {"tokens": jnp.int32, "attention_mask": jnp.int32}
    return {k: jnp.asarray(v, dtypes.get(k, jnp.float32)) for k, v in batch.items()}
