"""The model's forward pass inside shard_map on the (data, fsdp) mesh: FSDP, one layer's weights at a time.

    rows        each device its own b rows (grpo/sharding.py `batch_spec`), in M micro-batches of b / M
    lookup      tokens all_gathered over fsdp, looked up in the LOCAL vocab rows, psum_scatter back (`embed_lookup`)
    layer l     all_gather over fsdp of layer l's weights inside the layer scan, tagged GATHERED so the backward
                pass re-gathers them instead of keeping every layer's full weights alive
    final norm  gathered whole (it is tiny)

`fsdp_hidden_states` is what the training step (grpo/step.py) and the log-prob passes (grpo/logprobs.py
`sharded_token_logprobs`) run before the chunked unembedding; with shared prompts it also decides, in this one
place, whether each GRPO group's prompt runs once (model/shared_prompt.py) and returns the first column it kept.
`check_rows` is the one statement of the layout's requirement on a batch: its rows split evenly over the devices
and then over the micro-batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from grpo import sharding
from model.config import GemmaConfig
from model.forward import default_positions, embed_tokens, rms_norm, scan_layers
from model.shared_prompt import pack, prompt_sharing, shared_prompt_layer, tail_states

# checkpoint_name of all-gathered weights: never saved for the backward pass, always re-gathered.
GATHERED = "fsdp_gathered"


def check_rows(rows: int, mesh: Mesh, num_micro_batches: int, what: str) -> None:
    """A batch of `rows` rows must split evenly over the mesh's devices, then each device's rows over the
    micro-batches; a one-line ValueError naming `what` (the step, a log-prob pass) and both numbers otherwise."""
    divisor = mesh.size * num_micro_batches
    if rows % divisor:
        raise ValueError(f"{what}: batch of {rows} rows is not divisible by {divisor}: the rows must be divisible by "
                         f"devices x micro-batches = {divisor} ({mesh.size} x {num_micro_batches})")


def embed_lookup(local_embed: jax.Array, tokens: jax.Array, spec, model_cfg: GemmaConfig) -> jax.Array:
    """Inside shard_map: model.embed_tokens for this device's rows [b, T] -> [b, T, D], from the local shard.

    With the vocab rows split over an axis of f devices, each device looks up the tokens of all f peers in
    ITS rows (zeros for tokens it does not hold) and a psum_scatter hands every device the sum for its
    own tokens. Traffic is f * b * T * D activations, not the [V, D] table, and the backward pass
    scatters straight into the local rows (no full-size [V, D] gradient for the lookup).
    """
    axis = spec[0]
    if axis is None or spec[1] is not None:  # rows not split (fallback layouts): look up in the whole table
        return embed_tokens({"embed": sharding.gather(local_embed, spec)}, tokens, model_cfg)
    rows = local_embed.shape[0]
    ids = jax.lax.all_gather(tokens, axis) - jax.lax.axis_index(axis) * rows  # [f, b, T], local row numbers
    mine = (ids >= 0) & (ids < rows)
    x = embed_tokens({"embed": local_embed}, jnp.where(mine, ids, 0), model_cfg)  # [f, b, T, D]
    x = jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))
    return jax.lax.psum_scatter(x, axis, scatter_dimension=0)  # [b, T, D]: exactly one device adds non-zeros


def fsdp_hidden_states(
    local: dict, tokens: jax.Array, attention_mask: jax.Array, model_cfg: GemmaConfig, specs: dict, *,
    remat: bool = False, group: int = 1, tail: int | None = None,
) -> tuple[jax.Array, int]:
    """model.hidden_states inside shard_map: each layer's weights are all-gathered over fsdp as it runs.

    `local` holds this device's weight shards (params, or params with adapters attached), laid out as `specs`.
    Only one layer's full weights exist at a time. The gathered weights are never saved for the backward pass
    (re-gathered there instead, as FSDP does); with remat, nothing inside a layer is saved either.
    Returns (h, col): the final-normed states of columns col .. T - 1, [b, T - col, D]. col is 0, unless the rows
    are whole GRPO groups of `group` > 1 rows sharing their columns before the last `tail` (model/shared_prompt.py):
    then each group's prompt runs once and col = Tp - 1 (the last prompt state, then the completion's).
    """
    positions = default_positions(tokens, attention_mask)  # [b, T]
    valid = attention_mask.astype(bool)
    sharing = prompt_sharing(*tokens.shape, group, tail)
    layer = None
    if sharing is not None:  # one packed row [1, P*Tp + b*Tc]
        tokens, positions, valid = (pack(a, sharing) for a in (tokens, positions, valid))
        layer = functools.partial(shared_prompt_layer, sharing=sharing)
    x = embed_lookup(local["embed"], tokens, specs["embed"], model_cfg)  # [b, T, D] (packed: [1, N, D])
    per_layer = sharding.layer_specs(specs)

    def gather_layer(lp_local: dict) -> dict:  # one layer's full weights, tagged so the policy never saves them
        return jax.tree.map(lambda w, s: checkpoint_name(sharding.gather(w, s), GATHERED), lp_local, per_layer)

    policy = (jax.checkpoint_policies.nothing_saveable if remat
              else jax.checkpoint_policies.save_anything_except_these_names(GATHERED))
    x, _ = scan_layers(local["layers"], x, positions, valid, model_cfg, prepare_layer=gather_layer, remat_policy=policy,
                       layer=layer)
    final_norm = sharding.gather(local["final_norm"], specs["final_norm"])
    h = rms_norm(x, final_norm, model_cfg.rms_eps)
    return (h, 0) if sharing is None else (tail_states(h, sharing), sharing.prompt_len - 1)


def pad_columns(x: jax.Array, n: int) -> jax.Array:
    """[b, t] -> [b, n + t] with n zero columns in front: per-token values of the columns fsdp_hidden_states
    skipped (col of its result)."""
    return jnp.pad(x, ((0, 0), (n, 0))) if n else x
