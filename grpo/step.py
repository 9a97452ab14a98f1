"""One jitted GRPO step: forward, loss, backward, micro-batch accumulation, clip, AdamW, NaN guard.

The body runs under `jax.shard_map`; every collective is written here or in grpo/sharding.py:

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

LoRA (grpo/lora_step.py) runs the same body with the adapters as the trained tree and the base params as a
frozen input (laid out as above, never differentiated, never donated): `sharded_step` takes the loss as a
function of (trained, frozen).

A step whose loss or gradient norm is not finite is not applied: params and optimizer state come back
unchanged and metrics["skipped"] is 1.
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
from grpo.fused_unembed import fused_token_loss
from grpo.logprobs import fsdp_hidden_states, pad_columns, sharded_token_logprobs, sharing_group
from model.config import GemmaConfig
from model.params import check_against_schema, map_schema, param_schema

# [B]; "entropy_coef": the entropy bonus per row, as data so an adaptive coefficient never recompiles
ROW_KEYS = ("advantages", "truncated", "entropy_coef")
TOKEN_KEYS = ("tokens", "attention_mask", "completion_mask", "old_logprobs", "ref_logprobs")  # [B, T]
REQUIRED_KEYS = ("tokens", "attention_mask", "completion_mask", "advantages")


def make_schedule(grpo_cfg: GRPOConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps, or constant."""
    if grpo_cfg.lr_schedule == "cosine":
        decay_steps = max(grpo_cfg.total_steps, grpo_cfg.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(0.0, grpo_cfg.learning_rate, grpo_cfg.warmup_steps, decay_steps)
    if grpo_cfg.warmup_steps == 0:
        return optax.constant_schedule(grpo_cfg.learning_rate)
    warmup = optax.linear_schedule(0.0, grpo_cfg.learning_rate, grpo_cfg.warmup_steps)
    return optax.join_schedules([warmup, optax.constant_schedule(grpo_cfg.learning_rate)], [grpo_cfg.warmup_steps])


def decay_mask(model_cfg: GemmaConfig) -> dict:
    """True for the matrices (leaves with an "embed" axis); norms are never decayed."""
    return map_schema(lambda _, s: "embed" in s.axes, model_cfg)


def make_optimizer(grpo_cfg: GRPOConfig, model_cfg: GemmaConfig) -> optax.GradientTransformation:
    """AdamW with the schedule injected, so the state carries the learning rate each step used."""
    return adamw(grpo_cfg, decay_mask(model_cfg))


def adamw(grpo_cfg: GRPOConfig, mask) -> optax.GradientTransformation:
    """grpo_cfg's AdamW, decaying the leaves where `mask` is True (None: every leaf)."""
    inject = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return inject(learning_rate=make_schedule(grpo_cfg), b1=grpo_cfg.adam_b1, b2=grpo_cfg.adam_b2,
                  eps=grpo_cfg.adam_eps, weight_decay=grpo_cfg.weight_decay, mask=mask)


def init_train_state(params: dict, model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh) -> tuple[dict, object]:
    """Params placed on the mesh per the rules table, and a fresh optimizer state laid out to match.

    The returned params may share buffers with the input ones (no second copy of a big model) and the step
    donates them: treat the input params as consumed and keep using the returned ones.
    """
    params = place_params(params, model_cfg, mesh)
    tx = make_optimizer(grpo_cfg, model_cfg)
    return params, init_opt_state(tx, params, sharding.param_specs(model_cfg, mesh), mesh)


def init_opt_state(tx: optax.GradientTransformation, trained: dict, specs: dict, mesh: Mesh):
    """tx's fresh state for `trained` (params or adapters), each moment laid out like its leaf."""
    state_specs = sharding.opt_state_specs(jax.eval_shape(tx.init, trained), specs)
    return jax.jit(tx.init, out_shardings=sharding.named(mesh, state_specs))(trained)


def place_params(params: dict, model_cfg: GemmaConfig, mesh: Mesh) -> dict:
    """Params checked against the schema and laid out on the mesh per the rules table (e.g. the frozen
    reference model for make_sharded_logprobs). May alias the input buffers."""
    check_against_schema(params, param_schema(model_cfg), f"params do not match the {model_cfg.name} schema")
    return jax.device_put(params, sharding.named(mesh, sharding.param_specs(model_cfg, mesh)))


def make_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *, compiler_options: dict | None = None):
    """The jitted step(params, opt_state, batch) -> (params, opt_state, metrics); params and state donated.

    compiler_options go to XLA as they are (e.g. TPU scheduler flags; tests use optimization level 0).
    """
    specs = sharding.param_specs(model_cfg, mesh)

    def loss_of(params, frozen, mb, num_tokens, num_rows):
        return policy_loss_on(params, mb, num_tokens, num_rows, model_cfg=model_cfg, grpo_cfg=grpo_cfg, specs=specs)

    step = sharded_step(loss_of, specs, (), make_optimizer(grpo_cfg, model_cfg), grpo_cfg, mesh)
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)


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


def sharded_step(loss_of: Callable, specs: dict, frozen_specs: tuple, tx: optax.GradientTransformation,
                 grpo_cfg: GRPOConfig, mesh: Mesh) -> Callable:
    """The unjitted step(trained, opt_state, batch, *frozen) -> (trained, opt_state, metrics) under shard_map.

    trained: the pytree the optimizer updates (params; LoRA: adapters), laid out as `specs`. frozen: inputs
    the loss reads but never differentiates (LoRA: the base params), laid out as `frozen_specs`.
    loss_of(trained, frozen, micro_batch, num_tokens, num_rows) -> (loss, shares) runs on local shards.
    """
    def step(trained, opt_state, batch, *frozen):
        batch = _prepare_batch(batch, grpo_cfg, mesh)
        state_specs = sharding.opt_state_specs(opt_state, specs)
        batch_specs = {k: sharding.batch_spec(v.ndim) for k, v in batch.items()}
        body = functools.partial(_step_body, loss_of=loss_of, grpo_cfg=grpo_cfg, specs=specs, tx=tx,
                                 num_rows=batch["tokens"].shape[0])
        # in: trained leaves and their state per the rules table, batch split by rows, frozen per the rules
        # table; out: the same layouts, and metrics replicated (psummed inside: every device holds the same).
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs, state_specs, batch_specs, *frozen_specs),
                               out_specs=(specs, state_specs, P()), check_vma=True)
        return mapped(trained, opt_state, batch, *frozen)

    return step


def _step_body(trained, opt_state, batch, *frozen, loss_of, grpo_cfg, specs, tx, num_rows):
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
    ok = jnp.isfinite(shares["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {**shares, "grad_norm": grad_norm, "learning_rate": new_state.hyperparams["learning_rate"],
               "num_completion_tokens": num_tokens, "skipped": 1.0 - ok.astype(jnp.float32)}
    return keep(new_trained, trained), keep(new_state, opt_state), metrics


def _accumulate_grads(trained, frozen, batch, num_tokens, loss_of, grpo_cfg, specs, num_rows):
    """Per-device partial gradients (float32 shards) summed over the micro-batches, and metric shares."""
    m = grpo_cfg.num_micro_batches
    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)  # [M, b / M, ...]
    varying = jax.tree.map(lambda w, s: jax.lax.pcast(w, sharding.replicated_axes(s), to="varying"), trained, specs)

    def one(acc, mb):
        loss_fn = lambda t: loss_of(t, frozen, mb, num_tokens, num_rows)
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
    divisor = mesh.size * grpo_cfg.num_micro_batches
    if rows % divisor:
        raise ValueError(f"batch of {rows} rows must be divisible by devices x micro-batches = {divisor}")
    dtypes = {"tokens": jnp.int32, "attention_mask": jnp.int32}
    return {k: jnp.asarray(v, dtypes.get(k, jnp.float32)) for k, v in batch.items()}
