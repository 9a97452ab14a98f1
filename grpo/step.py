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

The shard_map gradient trap (shared/specs/grpo.md): with check_vma=True, the gradient of a param that
is replicated over an axis comes back already summed over that axis. We make the sum explicit
instead: params are `pcast` to varying over their replicated axes BEFORE differentiation, so the
gradients are per-device partial sums, and the psum above is the one and only reduction.

A step whose loss or gradient norm is not finite is not applied: params and optimizer state come back
unchanged and metrics["skipped"] is 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from grpo import loss as objective
from grpo import sharding
from grpo.config import GRPOConfig
from grpo.logprobs import fsdp_hidden_states, token_logprobs
from model.config import GemmaConfig
from model.params import is_spec, map_schema, param_schema

ROW_KEYS = ("advantages", "truncated")  # [B]
TOKEN_KEYS = ("tokens", "attention_mask", "completion_mask", "old_logprobs", "ref_logprobs")  # [B, T]
REQUIRED_KEYS = ("tokens", "attention_mask", "completion_mask", "advantages")


def make_schedule(cfg: GRPOConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps, or constant."""
    if cfg.lr_schedule == "cosine":
        decay_steps = max(cfg.total_steps, cfg.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, decay_steps)
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])


def decay_mask(model_cfg: GemmaConfig) -> dict:
    """True for the matrices (leaves with an "embed" axis); norms are never decayed."""
    return map_schema(lambda _, s: "embed" in s.axes, model_cfg)


def make_optimizer(cfg: GRPOConfig, model_cfg: GemmaConfig) -> optax.GradientTransformation:
    """AdamW with the schedule injected, so the state carries the learning rate each step used."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return adamw(learning_rate=make_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                 weight_decay=cfg.weight_decay, mask=decay_mask(model_cfg))


def init_train_state(params: dict, model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh) -> tuple[dict, object]:
    """Params placed on the mesh per the rules table, and a fresh optimizer state laid out to match.

    The returned params may share buffers with the input ones (no second copy of a big model) and the step
    donates them: treat the input params as consumed and keep using the returned ones.
    """
    params = place_params(params, model_cfg, mesh)
    specs = sharding.param_specs(model_cfg, mesh)
    tx = make_optimizer(grpo_cfg, model_cfg)
    state_specs = sharding.opt_state_specs(jax.eval_shape(tx.init, params), specs)
    opt_state = jax.jit(tx.init, out_shardings=sharding.named(mesh, state_specs))(params)
    return params, opt_state


def place_params(params: dict, model_cfg: GemmaConfig, mesh: Mesh) -> dict:
    """Params checked against the schema and laid out on the mesh per the rules table (e.g. the frozen
    reference model for make_sharded_logprobs). May alias the input buffers."""
    _check_params(params, model_cfg)
    return jax.device_put(params, sharding.named(mesh, sharding.param_specs(model_cfg, mesh)))


def make_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *, compiler_options: dict | None = None):
    """The jitted step(params, opt_state, batch) -> (params, opt_state, metrics); params and state donated.

    compiler_options go to XLA as they are (e.g. TPU scheduler flags; tests use optimization level 0).
    """
    specs = sharding.param_specs(model_cfg, mesh)
    tx = make_optimizer(grpo_cfg, model_cfg)

    def step(params, opt_state, batch):
        batch = _prepare_batch(batch, grpo_cfg, mesh)
        state_specs = sharding.opt_state_specs(opt_state, specs)
        batch_specs = {k: sharding.batch_spec(v.ndim) for k, v in batch.items()}
        body = functools.partial(_step_body, model_cfg=model_cfg, cfg=grpo_cfg, specs=specs, tx=tx,
                                 num_rows=batch["tokens"].shape[0])
        # in: params and state per the rules table, batch split by rows; out: the same layouts, and
        # metrics replicated (they are psummed inside, so every device holds the same values).
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs, state_specs, batch_specs),
                               out_specs=(specs, state_specs, P()), check_vma=True)
        return mapped(params, opt_state, batch)

    return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)


def _step_body(params, opt_state, batch, *, model_cfg, cfg, specs, tx, num_rows):
    mask = objective.training_mask(batch, cfg)
    num_tokens = jax.lax.psum(jnp.sum(mask), sharding.BATCH_AXES)
    grads, shares = _accumulate_grads(params, {**batch, "mask": mask}, num_tokens, model_cfg, cfg, specs, num_rows)
    # The one gradient reduction: over the axes each leaf is replicated on (see the trap above).
    grads = jax.tree.map(lambda g, s: jax.lax.psum(g, sharding.replicated_axes(s)), grads, specs)
    shares = jax.lax.psum(shares, sharding.BATCH_AXES)
    grad_norm = _global_norm(grads, specs)
    if cfg.max_grad_norm is not None:  # same rule as optax.clip_by_global_norm
        grads = jax.tree.map(
            lambda g: jnp.where(grad_norm < cfg.max_grad_norm, g, g / grad_norm * cfg.max_grad_norm), grads)
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, opt_state)  # a stable signature
    ok = jnp.isfinite(shares["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {**shares, "grad_norm": grad_norm, "learning_rate": new_state.hyperparams["learning_rate"],
               "num_completion_tokens": num_tokens, "skipped": 1.0 - ok.astype(jnp.float32)}
    return keep(new_params, params), keep(new_state, opt_state), metrics


def _accumulate_grads(params, batch, num_tokens, model_cfg, cfg, specs, num_rows):
    """Per-device partial gradients (float32 shards) summed over the micro-batches, and metric shares."""
    m = cfg.num_micro_batches
    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)  # [M, b / M, ...]
    varying = jax.tree.map(lambda w, s: jax.lax.pcast(w, sharding.replicated_axes(s), to="varying"), params, specs)

    def loss_fn(p, mb):
        p = objective.compute_params(p, cfg)
        h = fsdp_hidden_states(p, mb["tokens"], mb["attention_mask"], model_cfg, specs, remat=cfg.remat)
        embed = sharding.gather(p["embed"], specs["embed"])  # [V, D], only for the chunked unembedding
        logp, ent = token_logprobs(h, embed, mb["tokens"], model_cfg, chunk=cfg.logits_chunk,
                                   temperature=cfg.temperature, tail=cfg.logprob_tail)
        return objective.policy_loss(logp, ent, mb, mb["mask"], cfg, num_tokens, num_rows)

    def one(acc, mb):
        (_, shares), g = jax.value_and_grad(loss_fn, has_aux=True)(varying, mb)
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


def _prepare_batch(batch: dict, cfg: GRPOConfig, mesh: Mesh) -> dict:
    """Check keys and shapes at trace time (a clear error, not one deep inside shard_map) and cast dtypes."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    unexpected = sorted(set(batch) - set(ROW_KEYS) - set(TOKEN_KEYS))
    if missing or unexpected:
        raise ValueError(f"batch keys: missing {missing}, unexpected {unexpected}; "
                         f"expected {list(REQUIRED_KEYS)} + optional old_logprobs, ref_logprobs, truncated")
    if cfg.beta and "ref_logprobs" not in batch:
        raise ValueError(f"beta={cfg.beta} needs batch['ref_logprobs']; it is missing")
    rows, length = jnp.shape(batch["tokens"]) if jnp.ndim(batch["tokens"]) == 2 else (None, None)
    if rows is None or length < 2:
        raise ValueError(f"batch['tokens'] must be [B, T] with T >= 2, got shape {jnp.shape(batch['tokens'])}")
    for k, v in batch.items():
        want = (rows,) if k in ROW_KEYS else (rows, length)
        if jnp.shape(v) != want:
            raise ValueError(f"batch[{k!r}] must have shape {want}, got {jnp.shape(v)}")
    divisor = mesh.size * cfg.num_micro_batches
    if rows % divisor:
        raise ValueError(f"batch of {rows} rows must be divisible by devices x micro-batches = {divisor}")
    dtypes = {"tokens": jnp.int32, "attention_mask": jnp.int32}
    return {k: jnp.asarray(v, dtypes.get(k, jnp.float32)) for k, v in batch.items()}


def _check_params(params: dict, model_cfg: GemmaConfig) -> None:
    """Every schema leaf present with its shape, nothing extra: one message listing all that is wrong."""
    leaves = jax.tree_util.tree_leaves_with_path
    want = {jax.tree_util.keystr(p): s.shape for p, s in leaves(param_schema(model_cfg), is_leaf=is_spec)}
    got = {jax.tree_util.keystr(p): tuple(jnp.shape(x)) for p, x in leaves(params)}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    bad = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if missing or unexpected or bad:
        raise ValueError(f"params do not match the {model_cfg.name} schema: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {bad}")
