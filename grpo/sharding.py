"""The layout, written down: a (data, fsdp) mesh, one rules table, and the specs and collectives it implies.

    mesh axes   data  x  fsdp         (data * fsdp devices)
    batch       rows split over BOTH axes: P(("data", "fsdp"), None)   -- every device its own rows
    params      RULES maps logical axes (model/params.py schema) to mesh axes, in priority order;
                a mesh axis splits at most one dim of a leaf. So:
                  embed [V, D]                      P("fsdp", None)   vocab rows split
                  q/k/v [L, D, ., H], gate/up [L, D, F]  P(None, "fsdp", ...)   split along D
                  o [L, N, H, D], down [L, F, D]    D split (last dim)
                  norms                             replicated
                every matrix is 1/fsdp per device and replicated over data.
    adapters    LoRA (model/lora.py) by the same rules: a [L, D, r] split along D like its weight, b [L, r, D]
                (o, down) along D, the rank axis and N*H / K*H / F always whole.
    opt state   Adam's mu / nu copy their param's (or adapter's) spec; scalars (count, lr) are replicated.

Why vocab rows for the embedding: the token lookup can then run on the local rows (grpo/logprobs.py
`embed_lookup`), so its gradient lands in the local shard and never makes a full [V, D] buffer; the
gather for the unembedding and its reduce-scatter move whole contiguous rows.

A dim whose size is not divisible by its mesh axis falls back to the next rule, then to replicated
(logged as a warning), so any preset runs on any mesh, at the cost of memory for that leaf.

Axis type: Auto, on purpose. Every layout here is spelled out by hand (NamedSharding placement and
shard_map in/out specs), so we do not need jax 0.10's Explicit sharding-in-types; Auto keeps the
training loop's incidental jnp code on sharded arrays (reward math, slicing) free of Explicit-mode
"ambiguous sharding" errors.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.config import GemmaConfig
from model.lora import LoraConfig, lora_schema
from model.params import map_schema, map_specs

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dim is split over both: pure data parallelism across the mesh

# (logical axis, mesh axis), highest priority first; logical axes not listed are replicated.
RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "fsdp"),  # the embedding: split its rows (see the module docstring)
    ("embed", "fsdp"),  # every other matrix: split D, the one dim they all have
    ("mlp", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("layers", None),  # the layer scan slices this dim; it must stay whole on every device
    ("norm", None),
    ("lora_rank", None),  # adapters' rank axis: small, and every device multiplies by all of it
)


def parse_mesh(text: str | None, num_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; None/'' -> fsdp over num_devices. Checks the device count when
    num_devices is given. Bad text: a ValueError naming --mesh."""
    if not text:
        if num_devices is None:
            raise ValueError("--mesh: expected data=N,fsdp=M")
        return {"data": 1, "fsdp": num_devices}
    axes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in axes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: expected entries like data=2,fsdp=4, got {part!r} in {text!r}")
        axes[name] = int(value)
    used = axes["data"] * axes["fsdp"]
    if num_devices is not None and used != num_devices:
        raise ValueError(f"--mesh: {text} uses {used} devices but {num_devices} are present")
    return axes


def set_fake_cpu_devices(count: int, platform: str = "cpu") -> None:
    """Before JAX starts a backend: pick the platform and, on CPU, fake `count` devices, so a mesh of any size can
    be lowered and memory-analysed on one machine (bin/inspect). jax's own setting wins over XLA_FLAGS'
    --xla_force_host_platform_device_count."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("fake devices must be configured before JAX starts a backend")
    os.environ["JAX_PLATFORMS"] = platform
    jax.config.update("jax_platforms", platform)
    if platform == "cpu":
        jax.config.update("jax_num_cpu_devices", count)


def make_mesh(data: int = 1, fsdp: int | None = None) -> Mesh:
    """A (data, fsdp) mesh over the first data * fsdp of jax.devices(); fsdp defaults to the rest."""
    devices = jax.devices()
    if fsdp is None:
        fsdp = len(devices) // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; {len(devices)} available")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * fsdp])


def logical_to_spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh, name: str = "") -> P:
    """PartitionSpec for one array from its logical axes and RULES; non-divisible dims stay replicated."""
    known = [logical for logical, _ in RULES]
    unknown = sorted(set(axes) - set(known))
    if unknown:
        raise ValueError(f"{name}: logical axes {unknown} have no rule; known: {known}")
    out: list[str | None] = [None] * len(axes)
    for logical, axis in RULES:
        for dim, (size, a) in enumerate(zip(shape, axes, strict=True)):
            if a != logical or axis is None or axis in out:
                continue
            if size % mesh.shape[axis]:
                logging.warning("%s: dim %r of size %d not divisible by mesh axis %r (%d); replicated",
                                name, logical, size, axis, mesh.shape[axis])
                continue
            out[dim] = axis
    return P(*out)


def param_specs(model_cfg: GemmaConfig, mesh: Mesh) -> dict:
    """PartitionSpec per param leaf, from the one schema and the RULES table."""
    return map_schema(lambda path, s: logical_to_spec(s.shape, s.axes, mesh, "/".join(path)), model_cfg)


def adapter_specs(model_cfg: GemmaConfig, lora_cfg: LoraConfig, mesh: Mesh) -> dict:
    """PartitionSpec per LoRA adapter leaf, from model/lora.py's schema and the same RULES table."""
    schema = lora_schema(model_cfg, lora_cfg)
    return map_specs(lambda path, s: logical_to_spec(s.shape, s.axes, mesh, "lora/" + "/".join(path)), schema)


def opt_state_specs(opt_state, specs: dict):
    """PartitionSpec per optimizer-state leaf: param-shaped subtrees (Adam mu/nu) copy `specs`; the rest P()."""
    param_def = jax.tree.structure(specs)

    def is_param_tree(x) -> bool:
        return jax.tree.structure(x) == param_def

    return jax.tree.map(lambda x: specs if is_param_tree(x) else P(), opt_state, is_leaf=is_param_tree)


def batch_spec(ndim: int) -> P:
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def named(mesh: Mesh, specs):
    """Tree of NamedSharding from a tree of PartitionSpec."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated_axes(spec: P) -> tuple[str, ...]:
    """Mesh axes a leaf is NOT split over: its gradient is a partial sum over these and needs a psum."""
    used = {a for part in spec if part is not None for a in (part if isinstance(part, tuple) else (part,))}
    return tuple(a for a in MESH_AXES if a not in used)


def sharded_axes(spec: P) -> tuple[str, ...]:
    return tuple(a for a in MESH_AXES if a not in replicated_axes(spec))


def gather(x: jax.Array, spec: P) -> jax.Array:
    """Inside shard_map: all-gather every split dim of a local shard back to the full array.

    Its transpose (what autodiff runs in the backward pass) is psum_scatter: the reduce-scatter of the
    gradient over fsdp happens right where the weight was gathered, one layer at a time.
    """
    for dim, axis in enumerate(spec):
        # A size-1 axis holds the whole dim already: no collective (XLA:CPU would also run it in float32).
        if axis is not None and jax.lax.axis_size(axis) > 1:
            x = jax.lax.all_gather(x, axis, axis=dim, tiled=True)
    return x


def layer_specs(specs: dict) -> dict:
    """Specs of ONE layer's weights: the stacked specs minus their leading (replicated) "layers" dim."""
    return jax.tree.map(lambda s: P(*s[1:]), specs["layers"], is_leaf=lambda x: isinstance(x, P))
