"""Load and save HF-layout Gemma checkpoints (config.json + safetensors), one tensor at a time.

Name mapping is one table: our stacked param leaf -> HF tensor name per layer, with the transposes between
PyTorch's Linear layout [out, in] and ours ([D, N, H] for q etc.).

Reading goes through `safetensors.safe_open(file, framework="numpy")`. Opening parses and checks the header
(a truncated or corrupt file fails there; we re-raise that as one line naming the file); each tensor is
copied out of the memory-mapped file only when asked for, transformed, written into its slot of the stacked
leaf, and each finished leaf is put on its device (or its given sharding) before the next one is read.
bfloat16 arrives as `ml_dtypes.bfloat16`: safetensors asks numpy for the dtype named "bfloat16", which
ml_dtypes registers (safetensors >= 0.4.1).

Writing goes through `safetensors.numpy.save_file`, which takes a dict of host arrays, so a whole file's
tensors sit in host memory at once, in HF layout: transposed copies of every matrix, and a copy of
everything when params live on an accelerator (gigabytes on top of the params for a 2B model).
`save_tensors` therefore cuts the tensors into files of at most `MAX_SHARD_BYTES` (2 GiB) in transformers'
sharded layout (model-0000i-of-0000n.safetensors + model.safetensors.index.json), holding one
file's tensors at a time; a checkpoint under the limit is a single model.safetensors (the float32 270M is one
file). BUILD.md records the peak memory of a save.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors asks for)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model.config import GemmaConfig, load_config, save_config
from model.params import map_schema

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 << 30
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Text-tower prefixes: plain CausalLM, multimodal Gemma 3 (transformers >= 4.50), older multimodal files.
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

# --- the name table -----------------------------------------------------------------------------------------
# leaf -> (HF name under the prefix, HF->ours, ours->HF). `{i}` is the layer index. Shapes: ours per layer.


def _linear_in(d: int, n: int, h: int):
    """q/k/v: HF [n*H, D] (rows head-major) <-> ours [D, n, H]."""
    return (lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T)


def _name_table(cfg: GemmaConfig) -> dict[str, tuple[str, Callable, Callable]]:
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    transpose = (lambda w: w.T, lambda w: w.T)
    layer = "layers.{i}."
    table = {
        "embed": ("embed_tokens.weight", *same),
        "final_norm": ("norm.weight", *same),
        "layers/attn_norm": (layer + "input_layernorm.weight", *same),
        "layers/post_attn_norm": (layer + "post_attention_layernorm.weight", *same),
        "layers/pre_ffw_norm": (layer + "pre_feedforward_layernorm.weight", *same),
        "layers/post_ffw_norm": (layer + "post_feedforward_layernorm.weight", *same),
        "layers/q": (layer + "self_attn.q_proj.weight", *_linear_in(d, n, h)),
        "layers/k": (layer + "self_attn.k_proj.weight", *_linear_in(d, k, h)),
        "layers/v": (layer + "self_attn.v_proj.weight", *_linear_in(d, k, h)),
        # o: HF [D, N*H] <-> ours [N, H, D]
        "layers/o": (
            layer + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T
        ),
        "layers/gate": (layer + "mlp.gate_proj.weight", *transpose),
        "layers/up": (layer + "mlp.up_proj.weight", *transpose),
        "layers/down": (layer + "mlp.down_proj.weight", *transpose),
    }
    if cfg.use_qk_norm:
        table["layers/q_norm"] = (layer + "self_attn.q_norm.weight", *same)
        table["layers/k_norm"] = (layer + "self_attn.k_norm.weight", *same)
    return table


def _leaf_key(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _get(tree, key: str):
    for part in key.split("/"):
        tree = tree[part]
    return tree


def hf_tensor_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF `Gemma*ForCausalLM` checkpoint of `cfg` holds: `model.`-prefixed name -> shape."""
    table, out = _name_table(cfg), {}

    def visit(leaf_path, spec):
        name, _, to_hf = table[_leaf_key(leaf_path)]
        stacked = "{i}" in name
        one = jax.ShapeDtypeStruct(spec.shape[1:] if stacked else spec.shape, jnp.float32)
        shape = tuple(jax.eval_shape(to_hf, one).shape)
        for i in range(cfg.num_layers if stacked else 1):
            out["model." + name.format(i=i)] = shape

    map_schema(visit, cfg)
    return out


# --- reading ------------------------------------------------------------------------------------------------


def _open(file: Path, stack: contextlib.ExitStack):
    """A safe_open handle on `file`, closed with `stack`; a bad file is one ValueError naming it."""
    try:
        return stack.enter_context(safe_open(file, framework="numpy"))
    except SafetensorError as e:  # e.g. "incomplete metadata, file not fully covered" for a truncated file
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _open_tensors(path: Path, stack: contextlib.ExitStack) -> dict:
    """Map every tensor name to the open file holding it (single file or sharded with an index)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(f, str) for f in dict(weight_map).values()):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{index}: not a safetensors index (a JSON object whose weight_map maps names to "
                             "files)") from None
        files = {f: _open(path / f, stack) for f in sorted(set(weight_map.values()))}
        held = {f: set(h.keys()) for f, h in files.items()}
        return {name: files[f] for name, f in weight_map.items() if name in held[f]}  # the rest count as missing
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    f = _open(single, stack)
    return {name: f for name in f.keys()}


def _find_prefix(names) -> str:
    for p in _PREFIXES:
        if p + "embed_tokens.weight" in names:
            return p
    raise ValueError("no embed_tokens.weight under any known prefix " + ", ".join(_PREFIXES))


def load_hf_checkpoint(path: str | Path, dtype=jnp.float32, shardings=None) -> tuple[GemmaConfig, dict]:
    """Read an HF Gemma 2 / Gemma 3 checkpoint directory into (cfg, params).

    dtype: the param dtype (float32 on CPU; bfloat16 for TPU/GPU). shardings: optional pytree of
    `jax.sharding.Sharding` shaped like params; each leaf is placed there as soon as it is read.
    """
    path = Path(path)
    if not jnp.issubdtype(dtype, jnp.floating):  # an integer dtype would truncate every weight silently
        raise ValueError(f"dtype must be a floating-point type, got {jnp.dtype(dtype).name}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = load_config(path)
    table = _name_table(cfg)
    missing, bad_shape, bad_dtype, used = [], [], [], set()
    with contextlib.ExitStack() as stack:
        tensors = _open_tensors(path, stack)
        prefix = _find_prefix(tensors)

        def load_leaf(leaf_path, spec):
            key = _leaf_key(leaf_path)
            name, to_ours, _ = table[key]
            stacked = "{i}" in name
            want = spec.shape[1:] if stacked else spec.shape
            out = np.empty(spec.shape, np.dtype(dtype)) if stacked else None
            for i in range(cfg.num_layers if stacked else 1):
                full = prefix + name.format(i=i)
                used.add(full)
                if full not in tensors:
                    missing.append(full)
                    continue
                kind = tensors[full].get_slice(full).get_dtype()
                if kind not in _FLOAT_DTYPES:
                    bad_dtype.append(f"{full}: {kind}")
                    continue
                raw = tensors[full].get_tensor(full)  # a host copy of this one tensor
                try:
                    value = to_ours(raw)
                except ValueError:
                    value = None
                if value is None or value.shape != want:
                    bad_shape.append(f"{full}: got {list(raw.shape)}, expected {list(want)} in our layout")
                    continue
                if stacked:
                    out[i] = value  # casts while copying: no temporary
                else:
                    out = value.astype(np.dtype(dtype), copy=False)  # the copy above is ours to keep
            if missing or bad_shape or bad_dtype:
                return None  # we will raise; do not spend device memory on it
            return jnp.asarray(out) if shardings is None else jax.device_put(out, _get(shardings, key))

        params = map_schema(load_leaf, cfg)
    expected_text = {n for n in tensors if n.startswith(prefix)} - {prefix + "lm_head.weight"}
    if prefix == "model.":
        expected_text |= {n for n in tensors if not n.startswith(prefix) and n != "lm_head.weight"}
    unexpected = sorted(expected_text - used)
    _raise_if_bad(path, missing, unexpected, bad_shape, bad_dtype)
    return cfg, params


def _raise_if_bad(path: Path, missing: list, unexpected: list, bad_shape: list, bad_dtype: list) -> None:
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", bad_shape), ("unsupported dtypes", bad_dtype)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems))


# --- writing ------------------------------------------------------------------------------------------------


def save_hf_checkpoint(path: str | Path, cfg: GemmaConfig, params: dict, *,
                       max_shard_bytes: int = MAX_SHARD_BYTES, host: Callable = np.asarray,
                       write: bool = True) -> Path:
    """Write config.json + safetensors in the HF layout (loadable by transformers, vLLM, llama.cpp's converter).

    Tensors are fetched to the host one layer at a time, in HF order (embedding, final norm, then layer by
    layer), and written by `save_tensors`. A multi-host run calls this in every process with `host` a collective
    fetch (grpo.multihost.host_array) and `write` True in one of them: the others fetch the same tensors, in the
    same order, and write nothing.
    """
    path = Path(path)
    table = _name_table(cfg)

    def tensors():
        for key, (name, _, to_hf) in table.items():
            if "{i}" not in name:
                yield "model." + name, to_hf(host(_get(params, key)))
        for i in range(cfg.num_layers):
            for key, (name, _, to_hf) in table.items():
                if "{i}" in name:
                    yield "model." + name.format(i=i), to_hf(host(_get(params, key)[i]))

    if not write:
        for _ in tensors():
            pass
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors(), max_shard_bytes=max_shard_bytes)
    save_config(path, cfg, torch_dtype=np.dtype(params["embed"].dtype).name)
    return path


def save_tensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write (HF name, host array) pairs into directory `path`; returns the file names written.

    Consecutive tensors are grouped into files of at most `max_shard_bytes` (a larger tensor gets a file of
    its own); only the current group is held. One group is written as model.safetensors, more as
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json, as transformers does. Each file is
    written under a temporary name and renamed into place; weight files of an earlier save that the new
    layout does not use are removed, so the directory never mixes two saves' layouts.
    """
    path = Path(path)
    written: list[tuple[Path, list[str], int]] = []  # (temp file, tensor names, bytes)
    group: dict[str, np.ndarray] = {}
    group_bytes = 0

    def flush():
        tmp = _temp_name(path, ".safetensors")
        written.append((tmp, sorted(group), group_bytes))
        save_file(group, tmp, metadata={"format": "pt"})  # transformers refuses a file without "format"
        tmp.chmod(0o644)  # safetensors >= 0.8 writes through a private (0600) temp file; weights are shareable
        group.clear()

    try:
        for name, x in tensors:
            x = np.ascontiguousarray(x)
            if group and group_bytes + x.nbytes > max_shard_bytes:
                flush()
                group_bytes = 0
            group[name] = x
            group_bytes += x.nbytes
        if group or not written:
            flush()
        n = len(written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _, _), name in zip(written, names, strict=True):
            os.replace(tmp, path / name)
        if n > 1:
            index = {"metadata": {"total_size": sum(b for _, _, b in written)},
                     "weight_map": {t: f for (_, ts, _), f in zip(written, names, strict=True) for t in ts}}
            _write_text_atomic(path / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    except BaseException:
        for tmp, _, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    stale = {SINGLE_FILE, INDEX_FILE, *(p.name for p in path.glob("model-*-of-*.safetensors"))}
    for name in stale - set(names) - ({INDEX_FILE} if n > 1 else set()):
        (path / name).unlink(missing_ok=True)
    return names + ([INDEX_FILE] if n > 1 else [])


def _temp_name(directory: Path, suffix: str) -> Path:
    return directory / f".tmp-{uuid.uuid4().hex}{suffix}"


def _write_text_atomic(file: Path, text: str) -> None:
    tmp = _temp_name(file.parent, file.suffix)
    tmp.write_text(text)
    os.replace(tmp, file)
