"""LoRA adapters as a plain pytree beside the params: schema, init, attach to the forward pass, merge.

    adapters = {"layers": {target: {"a": [L, in, r], "b": [L, r, out]}}}   for target in LoraConfig.targets

    target      W (model/params.py)   in     out      a axes                      b axes
    q           [L, D, N, H]          D      N*H      (layers, embed, lora_rank)  (layers, lora_rank, heads)
    k, v        [L, D, K, H]          D      K*H      (layers, embed, lora_rank)  (layers, lora_rank, kv_heads)
    o           [L, N, H, D]          N*H    D        (layers, heads, lora_rank)  (layers, lora_rank, embed)
    gate, up    [L, D, F]             D      F        (layers, embed, lora_rank)  (layers, lora_rank, mlp)
    down        [L, F, D]             F      D        (layers, mlp, lora_rank)    (layers, lora_rank, embed)

The model computes x @ W + (x @ a) @ b * (alpha / r) (model/forward.py `project`); W + a @ b * scale is only
formed by `merge`, for the sampler and for export. Init as PEFT does in spirit: b = 0, so a fresh adapter
leaves the model exactly as it was, and a ~ normal(0, 1/in), so the first updates of b see unit-scale features.

The schema uses model/params.py's ParamSpec, so init (`init_from_schema`) and sharding (grpo/sharding.py's
rules: "lora_rank" is replicated, the other axes split as the params' do) come from the same table. Leaf
paths ("layers/q/a") never collide with param paths ("layers/q"), so a checkpoint of one cannot be
restored as the other.

alpha defaults to 2 * rank (scale 2, whatever the rank), a common choice for LoRA fine-tuning; rsLoRA
and PEFT's own default (alpha 8) are a flag away.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from model.config import GemmaConfig
from model.forward import LORA
from model.params import ParamSpec, check_against_schema, init_from_schema, map_specs

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: rank r, alpha (scale = alpha / r; None: 2 * rank) and which projections get one."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise ValueError(f"--lora_rank must be an integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))  # numpy's integers hash and print as Python's
        # Normalised here so equal settings hash equal (the config is a static jit argument).
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:  # rank 0 (no adapters) scales nothing
        return self.alpha / self.rank if self.rank else 0.0


def target_dims(model_cfg: GemmaConfig) -> dict[str, tuple[int, int, str, str]]:
    """Per target: (in, out, in logical axis, out logical axis) of its weight viewed as an [in, out] matrix."""
    d, f, nh, kh = model_cfg.embed_dim, model_cfg.hidden_dim, model_cfg.num_heads * model_cfg.head_dim, (
        model_cfg.num_kv_heads * model_cfg.head_dim)
    return {"q": (d, nh, "embed", "heads"), "k": (d, kh, "embed", "kv_heads"), "v": (d, kh, "embed", "kv_heads"),
            "o": (nh, d, "heads", "embed"), "gate": (d, f, "embed", "mlp"), "up": (d, f, "embed", "mlp"),
            "down": (f, d, "mlp", "embed")}


def validate_lora(lora_cfg: LoraConfig, model_cfg: GemmaConfig) -> None:
    """One-line ValueErrors naming the bin/train flag. Rank 0 means no adapters (full fine-tuning) and passes."""
    unknown = [t for t in lora_cfg.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"--lora_targets: unknown target(s) {unknown}; choose from {','.join(TARGETS)}")
    if len(set(lora_cfg.targets)) != len(lora_cfg.targets):
        raise ValueError(f"--lora_targets: a target is listed twice in {','.join(lora_cfg.targets)}")
    if lora_cfg.rank < 0:
        raise ValueError(f"--lora_rank must be >= 0 (0: full fine-tuning), got {lora_cfg.rank}")
    if lora_cfg.rank == 0:
        return
    if not lora_cfg.targets:
        raise ValueError("--lora_targets is empty; name at least one of " + ",".join(TARGETS))
    dims = target_dims(model_cfg)
    smallest = min(min(dims[t][:2]) for t in lora_cfg.targets)
    if lora_cfg.rank > smallest:
        raise ValueError(f"--lora_rank {lora_cfg.rank} exceeds the smallest dimension of the targeted weights "
                         f"of {model_cfg.name} ({smallest})")
    if not 0 < lora_cfg.alpha < math.inf:
        raise ValueError(f"--lora_alpha must be > 0 and finite, got {lora_cfg.alpha:g}")


def lora_schema(model_cfg: GemmaConfig, lora_cfg: LoraConfig) -> dict:
    """Nested dict shaped like the adapters, a ParamSpec per leaf: a ~ normal(0, 1/in), b = 0."""
    dims, r, n = target_dims(model_cfg), lora_cfg.rank, model_cfg.num_layers
    pair = lambda i, o, ia, oa: {"a": ParamSpec((n, i, r), ("layers", ia, "lora_rank"), "normal", i),
                                 "b": ParamSpec((n, r, o), ("layers", "lora_rank", oa), "zeros")}
    return {"layers": {t: pair(*dims[t]) for t in lora_cfg.targets}}


def init_adapters(key: jax.Array, model_cfg: GemmaConfig, lora_cfg: LoraConfig, dtype=jnp.float32) -> dict:
    """Fresh adapters (b = 0: the adapted model starts exactly at the base model). Keep them float32: they
    are the trained weights, and bf16 would lose small AdamW updates as it does for full fine-tuning."""
    validate_lora(lora_cfg, model_cfg)
    return init_from_schema(key, lora_schema(model_cfg, lora_cfg), dtype)


def abstract_adapters(model_cfg: GemmaConfig, lora_cfg: LoraConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every adapter leaf (bin/inspect, checkpoint templates)."""
    return map_specs(lambda _, s: jax.ShapeDtypeStruct(s.shape, dtype), lora_schema(model_cfg, lora_cfg))


def attach(params: dict, adapters: dict) -> dict:
    """params with adapters["layers"] under params["layers"]["lora"]: one tree the layer scan slices per layer.

    Pure structure (works on arrays, specs or shapes alike); `with_adapters` is what the forward pass wants.
    """
    return {**params, "layers": {**params["layers"], LORA: adapters["layers"]}}


def with_adapters(params: dict, adapters: dict, lora_cfg: LoraConfig) -> dict:
    """params the forward pass (and the sampler) run as base + adapters: b pre-multiplied by alpha / r."""
    scaled = {"layers": {t: {"a": p["a"], "b": p["b"] * jnp.asarray(lora_cfg.scale, p["b"].dtype)}
                         for t, p in adapters["layers"].items()}}
    return attach(params, scaled)


def merge(params: dict, adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig) -> dict:
    """Plain params with W + (a @ b) * alpha / r for every target, in W's shape and dtype (for sampling, export).

    Only the targeted matrices are new arrays (one jitted call); every other leaf is the input's own array,
    so merging costs the targets' memory, not a second model. On a mesh the merged leaves keep W's layout.
    """
    check_adapters(adapters, model_cfg, lora_cfg)
    targets = {t: params["layers"][t] for t in adapters["layers"]}
    merged = _merged_targets(targets, adapters["layers"], lora_cfg.scale)
    return {**params, "layers": {**params["layers"], **merged}}


@functools.partial(jax.jit, static_argnames="scale")
def _merged_targets(weights: dict, pairs: dict, scale: float) -> dict:
    """W + scale * a @ b per target: the sum formed in float32 and rounded once to W's dtype."""
    def one(w, pair):
        delta = jnp.einsum("lir,lro->lio", pair["a"].astype(jnp.float32), pair["b"].astype(jnp.float32))  # [L, in, out]
        return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)

    with jax.named_scope("lora_merge"):
        return {t: one(w, pairs[t]) for t, w in weights.items()}


def check_adapters(adapters: dict, model_cfg: GemmaConfig, lora_cfg: LoraConfig) -> None:
    """Every schema leaf present with its shape, nothing extra: one message listing all that is wrong."""
    check_against_schema(adapters, lora_schema(model_cfg, lora_cfg),
                         f"adapters do not match rank {lora_cfg.rank}, targets {','.join(lora_cfg.targets)} "
                         f"on {model_cfg.name}")


def num_adapter_params(model_cfg: GemmaConfig, lora_cfg: LoraConfig) -> int:
    """Trainable parameters: L * r * (in + out) summed over the targets."""
    dims = target_dims(model_cfg)
    return model_cfg.num_layers * lora_cfg.rank * sum(dims[t][0] + dims[t][1] for t in lora_cfg.targets)
