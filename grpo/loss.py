"""The GRPO objective per token, its three aggregations, and the step's metrics.

    ratio  = exp(logp - logp_old)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(logp_ref - logp) - (logp_ref - logp) - 1      # k3: unbiased, always >= 0
    (both log-ratios clamped to +-20 first, as verl does: see per_token_loss)
    loss_t = pg + beta * kl

Aggregations take their denominators (completion tokens, rows) as ARGUMENTS, for the whole batch:
a micro-batch on one device contributes sum(its loss_t) / global denominator, so summing the
pieces over micro-batches and devices gives exactly the full-batch loss and gradient. Rows masked out whole
(groups without signal, truncated rows under mask_truncated_completions) leave token_mean's denominator but stay
in sequence_mean's and dr_grpo's row count B, as in TRL: for those two the step's gradient shrinks with the share
of rows kept.

Metrics (kl, clip_frac, entropy) are token means over completion tokens whatever the loss_type;
loss and pg_loss use the loss_type's aggregation. kl exists only when reference logprobs were given. The
entropy bonus (GRPOConfig.entropy_coef, grpo/fused_unembed.py) is not in the `loss` metric: that stays the
policy loss, and `entropy` shows what the bonus pushes on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo.config import GRPOConfig
from grpo.logprobs import cast_params, tail_start, token_logprobs
from model.config import GemmaConfig
from model.forward import hidden_states

LOG_RATIO_BOUND = 20.0  # verl's clamp of log-ratios: far from any real token's, far below float32's exp overflow


def per_token_loss(
    logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array, grpo_cfg: GRPOConfig
) -> dict[str, jax.Array]:
    """[B, T] pieces: loss, pg, clipped (1.0 where the clip is active), kl (only if ref_logp is given).

    Log-ratios are clamped to +-LOG_RATIO_BOUND before exp (as verl does): a padding position's log-probs drift
    freely (no loss reaches them), and exp past ~88 is float32 inf, whose 0 * inf under the mask is NaN."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    a = advantages[:, None] if advantages.ndim == 1 else advantages  # [B, 1] (a row's tokens share it) or [B, T]
    low, high = 1.0 - grpo_cfg.epsilon_low, 1.0 + grpo_cfg.epsilon_high
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, low, high) * a)
    # The clip is active (zero gradient) exactly where the clipped term is the smaller one.
    clipped = ((ratio < low) & (a < 0)) | ((ratio > high) & (a > 0))
    out = {"pg": pg, "clipped": clipped.astype(jnp.float32), "loss": pg}
    if ref_logp is not None:
        d = jnp.clip(ref_logp - logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        out["kl"] = jnp.exp(d) - d - 1.0
        if grpo_cfg.beta:
            out["loss"] = pg + grpo_cfg.beta * out["kl"]
    elif grpo_cfg.beta:
        raise ValueError(f"beta={grpo_cfg.beta} needs ref_logprobs; none were given")
    return out


def aggregate(x: jax.Array, mask: jax.Array, grpo_cfg: GRPOConfig, num_tokens: jax.Array, num_rows: int) -> jax.Array:
    """This batch slice's share of the loss_type mean of x [B, T] over `mask`, given whole-batch denominators."""
    if grpo_cfg.loss_type == "token_mean":  # DAPO: every completion token weighs the same
        return jnp.sum(x * mask) / jnp.maximum(num_tokens, 1.0)
    if grpo_cfg.loss_type == "sequence_mean":  # original GRPO: every row weighs the same
        per_row = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.sum(per_row) / num_rows
    # dr_grpo: a constant denominator, so long and short completions are not re-weighted
    return jnp.sum(x * mask) / (num_rows * grpo_cfg.max_completion_length)


def token_weights(mask: jax.Array, grpo_cfg: GRPOConfig, num_tokens: jax.Array, num_rows: int) -> jax.Array:
    """[B, T] w with sum(w * x) == aggregate(x, mask, ...) for any x: the loss_type as a weight per token.

    aggregate is linear in x, so w is its gradient: the loss_type switch is written once, in aggregate."""
    share = lambda x: aggregate(x, mask, grpo_cfg, num_tokens, num_rows)
    return jax.grad(share)(jnp.zeros_like(mask, jnp.float32))


def token_loss_fn(grpo_cfg: GRPOConfig, has_old: bool):
    """The per-token loss L(lp, aux) for grpo/fused_unembed.py: aux holds [B, c] "advantage", "old" (if
    has_old; else old = stop_gradient(lp), ratio 1) and "ref" (if given)."""
    def token_loss(lp: jax.Array, aux: dict) -> jax.Array:
        old = aux["old"] if has_old else jax.lax.stop_gradient(lp)
        return per_token_loss(lp, old, aux.get("ref"), aux["advantage"], grpo_cfg)["loss"]

    return token_loss


def fused_aux(batch: dict, mask: jax.Array, grpo_cfg: GRPOConfig, num_tokens: jax.Array, num_rows: int) -> dict:
    """The [B, T] inputs of token_loss_fn, plus "weight" (and "entropy_weight" with an entropy bonus): what
    fused_token_loss needs besides the states."""
    aux = {"weight": token_weights(mask, grpo_cfg, num_tokens, num_rows),
           "advantage": jnp.broadcast_to(batch["advantages"].astype(jnp.float32)[:, None], mask.shape)}
    if "old_logprobs" in batch:
        aux["old"] = batch["old_logprobs"]
    if "ref_logprobs" in batch:
        aux["ref"] = batch["ref_logprobs"]
    # the bonus, weighted like the loss: loss -= sum_t entropy_weight_t * H_t; a fixed coefficient from the config
    # and/or a per-row one from the batch (the adaptive controller's, grpo/entropy_control.py)
    coef = grpo_cfg.entropy_coef
    if "entropy_coef" in batch:
        coef = coef + batch["entropy_coef"].astype(jnp.float32)[:, None]  # [B, 1]
    if "entropy_coef" in batch or grpo_cfg.entropy_coef:
        aux["entropy_weight"] = coef * aux["weight"]
    return aux


def training_mask(batch: dict, grpo_cfg: GRPOConfig) -> jax.Array:
    """[B, T] float32: completion tokens that get loss (padding, prompt and, if asked, truncated rows out)."""
    mask = batch["completion_mask"].astype(jnp.float32) * batch["attention_mask"].astype(jnp.float32)
    if grpo_cfg.logprob_tail is not None:  # no log-probs are computed before the tail: those tokens get no loss
        length = mask.shape[1]
        mask = mask * (jnp.arange(length) >= tail_start(length, grpo_cfg.logprob_tail))[None, :]
    if grpo_cfg.mask_truncated_completions:
        if "truncated" not in batch:
            raise ValueError("mask_truncated_completions=True needs batch['truncated'] [B] bool; it is missing")
        mask = mask * (1.0 - batch["truncated"].astype(jnp.float32))[:, None]
    return mask


def policy_loss(
    logp: jax.Array, entropy: jax.Array, batch: dict, mask: jax.Array, grpo_cfg: GRPOConfig, num_tokens: jax.Array,
    num_rows: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metric shares) for a slice of the batch; shares sum over slices to the batch metrics.

    Without batch["old_logprobs"] the sampler's policy is the current one (num_iterations == 1):
    old = stop_gradient(logp), ratio == 1, and no extra forward pass is needed.
    """
    old = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logp)
    t = per_token_loss(logp, old, batch.get("ref_logprobs"), batch["advantages"].astype(jnp.float32), grpo_cfg)
    token_share = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask) / jnp.maximum(num_tokens, 1.0)
    loss = aggregate(t["loss"], mask, grpo_cfg, num_tokens, num_rows)
    shares = {
        "loss": jax.lax.stop_gradient(loss),
        "pg_loss": jax.lax.stop_gradient(aggregate(t["pg"], mask, grpo_cfg, num_tokens, num_rows)),
        "clip_frac": token_share(t["clipped"]),
        "entropy": token_share(entropy),
    }
    if "kl" in t:
        shares["kl"] = token_share(t["kl"])
    return loss, shares


def compute_params(params: dict, grpo_cfg: GRPOConfig) -> dict:
    """The weights the forward pass uses: cast to grpo_cfg.compute_dtype (gradients flow back through the cast)."""
    return cast_params(params, grpo_cfg.compute_dtype)


def grpo_loss(
    params: dict, batch: dict, model_cfg: GemmaConfig, grpo_cfg: GRPOConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The whole-batch loss on one device (no mesh): the reference the sharded step must equal. It has no entropy
    bonus (that term exists only in the fused path; tests/test_fused_unembed.py checks it against autodiff)."""
    if grpo_cfg.entropy_coef:
        raise ValueError("grpo_loss has no entropy bonus: entropy_coef must be 0 for the reference loss")
    mask = training_mask(batch, grpo_cfg)
    params = compute_params(params, grpo_cfg)
    h = hidden_states(params, batch["tokens"], model_cfg, attention_mask=batch["attention_mask"], remat=grpo_cfg.remat)
    logp, ent = token_logprobs(h, params["embed"], batch["tokens"], model_cfg, chunk=grpo_cfg.logits_chunk,
                               temperature=grpo_cfg.temperature, tail=grpo_cfg.logprob_tail)
    return policy_loss(logp, ent, batch, mask, grpo_cfg, jnp.sum(mask), batch["tokens"].shape[0])
