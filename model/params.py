"""The one parameter schema: every weight's path, shape, logical axes and init, for any GemmaConfig.

This table drives random init (`init_params`), checkpoint loading and saving (model/checkpoint.py
maps each leaf to its HF tensor names) and sharding (grpo/ maps logical axes to mesh axes). LoRA adapters
(model/lora.py) are described with the same ParamSpec, so `init_from_schema` and the sharding rules serve them too.

Params are a plain nested dict. Per-layer weights are STACKED along a leading L axis so the
forward pass is one `lax.scan` over layers (one layer compiled, not L).

    embed       [V, D]         tied: also the unembedding
    final_norm  [D]
    layers/
      attn_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm  [L, D]   (zero-centred: y * (1 + w))
      q [L, D, N, H]   k, v [L, D, K, H]   o [L, N, H, D]
      q_norm, k_norm [L, H]   (Gemma 3 only)
      gate, up [L, D, F]   down [L, F, D]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from model.config import GemmaConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" (std = 1/sqrt(fan_in)), "embed" or "zeros"
    fan_in: int = 1


def param_schema(cfg: GemmaConfig) -> dict:
    """Nested dict with the same structure as params, holding a ParamSpec per leaf."""
    v, d, f, n, k, h, L = (cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.num_layers)
    norm = ParamSpec((L, d), ("layers", "norm"), "zeros")
    layers = {
        "attn_norm": norm,
        "post_attn_norm": norm,
        "pre_ffw_norm": norm,
        "post_ffw_norm": norm,
        "q": ParamSpec((L, d, n, h), ("layers", "embed", "heads", "head_dim"), "normal", d),
        "k": ParamSpec((L, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), "normal", d),
        "v": ParamSpec((L, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), "normal", d),
        "o": ParamSpec((L, n, h, d), ("layers", "heads", "head_dim", "embed"), "normal", n * h),
        "gate": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal", d),
        "up": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal", d),
        "down": ParamSpec((L, f, d), ("layers", "mlp", "embed"), "normal", f),
    }
    if cfg.use_qk_norm:
        layers["q_norm"] = ParamSpec((L, h), ("layers", "head_dim"), "zeros")
        layers["k_norm"] = ParamSpec((L, h), ("layers", "head_dim"), "zeros")
    return {
        "embed": ParamSpec((v, d), ("vocab", "embed"), "embed", d),
        "final_norm": ParamSpec((d,), ("norm",), "zeros"),
        "layers": layers,
    }


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[tuple[str, ...], ParamSpec], object], schema: dict) -> dict:
    """Apply fn(path, spec) to every leaf of a schema (this one or model/lora.py's); a dict shaped like it."""
    return jax.tree_util.tree_map_with_path(lambda path, spec: fn(tuple(p.key for p in path), spec), schema,
                                            is_leaf=is_spec)


def map_schema(fn: Callable[[tuple[str, ...], ParamSpec], object], cfg: GemmaConfig) -> dict:
    """Apply fn(path, spec) to every leaf of the param schema; returns a dict shaped like params."""
    return map_specs(fn, param_schema(cfg))


def abstract_params(cfg: GemmaConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every param: for lowering without weights (bin/inspect)."""
    return map_schema(lambda _, s: jax.ShapeDtypeStruct(s.shape, dtype), cfg)


def init_params(key: jax.Array, cfg: GemmaConfig, dtype=jnp.float32) -> dict:
    """Random weights for any config: normal(0, 1/sqrt(fan_in)) for matrices, zeros for norms."""
    return init_from_schema(key, param_schema(cfg), dtype)


def init_from_schema(key: jax.Array, schema: dict, dtype=jnp.float32) -> dict:
    """One array per schema leaf, each from its own split of `key`, drawn as its spec's `init` says."""
    leaves, treedef = jax.tree_util.tree_flatten(schema, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def one(k, s: ParamSpec):
        if s.init == "zeros":
            return jnp.zeros(s.shape, dtype)
        # Embeddings are multiplied by sqrt(D) on the way in, so 1/sqrt(D) gives unit-scale activations.
        return (jax.random.normal(k, s.shape, jnp.float32) / jnp.sqrt(s.fan_in)).astype(dtype)

    return jax.tree_util.tree_unflatten(treedef, [one(k, s) for k, s in zip(keys, leaves, strict=True)])


def check_against_schema(tree: dict, schema: dict, what: str) -> None:
    """Every schema leaf present with its shape, nothing extra: one ValueError listing all that is wrong,
    starting with `what` (e.g. "params do not match the gemma2-2b schema")."""
    leaves = jax.tree_util.tree_leaves_with_path
    want = {jax.tree_util.keystr(p): s.shape for p, s in leaves(schema, is_leaf=is_spec)}
    got = {jax.tree_util.keystr(p): tuple(jnp.shape(x)) for p, x in leaves(tree)}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    bad = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing {missing}, unexpected {unexpected}, wrong shapes {bad}")
