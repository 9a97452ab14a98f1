"""Load and save HF-layout Gemma checkpoints (config.json + safetensors), one tensor at a time.

Name mapping is one table: our stacked param leaf -> HF tensor name per layer, with the
transposes between PyTorch's Linear layout [out, in] and ours ([D, N, H] for q etc.).
A 2B checkpoint never needs two full copies in host memory: each HF tensor is memory-mapped,
transformed, written into its slot of the stacked leaf, and each finished leaf can be placed
straight onto a device sharding.

safetensors is read and written by this file directly (an 8-byte header length, a JSON header,
raw little-endian data): that gives bfloat16 through ml_dtypes, exact truncation checks, and
streaming writes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from model.config import GemmaConfig, config_to_hf, load_config
from model.params import map_schema

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
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


# --- safetensors files ----------------------------------------------------------------------------------------


class _SafetensorsFile:
    """Memory-mapped read access to one .safetensors file, with its header validated up front."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{path}: truncated or corrupt (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{path}: corrupt safetensors header") from None
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise ValueError(f"{path}: truncated (tensors need {self.data_start + end} bytes, file has {size})")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        lo, hi = e["data_offsets"]
        raw = self._mm[self.data_start + lo : self.data_start + hi]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def _open_tensors(path: Path) -> dict[str, _SafetensorsFile]:
    """Map every tensor name to the file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: _SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
        return {name: files[f] for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    f = _SafetensorsFile(single)
    return {name: f for name in f.entries}


def _find_prefix(names) -> str:
    for p in _PREFIXES:
        if p + "embed_tokens.weight" in names:
            return p
    raise ValueError("no embed_tokens.weight under any known prefix " + ", ".join(_PREFIXES))


def _leaf_key(path: tuple[str, ...]) -> str:
    return "/".join(path)


def load_hf_checkpoint(path: str | Path, dtype=jnp.float32, shardings=None) -> tuple[GemmaConfig, dict]:
    """Read an HF Gemma 2 / Gemma 3 checkpoint directory into (cfg, params).

    dtype: the param dtype (float32 on CPU; bfloat16 for TPU/GPU). shardings: optional pytree of
    `jax.sharding.Sharding` shaped like params; each leaf is placed there as soon as it is read.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = load_config(path)
    tensors = _open_tensors(path)
    prefix = _find_prefix(tensors)
    table = _name_table(cfg)
    missing, bad_shape, used = [], [], set()

    def load_leaf(leaf_path, spec):
        name, to_ours, _ = table[_leaf_key(leaf_path)]
        stacked = "{i}" in name
        out = np.empty(spec.shape, np.dtype(dtype))
        for i in range(cfg.num_layers if stacked else 1):
            full = prefix + name.format(i=i)
            used.add(full)
            if full not in tensors:
                missing.append(full)
                continue
            raw = tensors[full].get(full)
            want = spec.shape[1:] if stacked else spec.shape
            try:
                value = to_ours(raw)
            except ValueError:
                value = None
            if value is None or value.shape != want:
                bad_shape.append(f"{full}: got {list(raw.shape)}, expected {list(want)} in our layout")
                continue
            out[i if stacked else ...] = value.astype(out.dtype)
        return out

    host = map_schema(load_leaf, cfg)
    expected_text = {n for n in tensors if n.startswith(prefix)} - {prefix + "lm_head.weight"}
    if prefix == "model.":
        expected_text |= {n for n in tensors if not n.startswith(prefix) and n != "lm_head.weight"}
    unexpected = sorted(expected_text - used)
    _raise_if_bad(path, missing, unexpected, bad_shape)
    if shardings is None:
        return cfg, jax.tree.map(jnp.asarray, host)
    return cfg, jax.tree.map(lambda x, s: jax.device_put(x, s), host, shardings)


def _raise_if_bad(path: Path, missing: list, unexpected: list, bad_shape: list) -> None:
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", bad_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems))


def save_hf_checkpoint(path: str | Path, cfg: GemmaConfig, params: dict) -> Path:
    """Write config.json + model.safetensors in the HF layout (loadable by transformers, vLLM, llama.cpp)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    table = _name_table(cfg)
    tensors: list[tuple[str, jax.ShapeDtypeStruct, Callable[[], np.ndarray]]] = []

    def collect(leaf_path, _spec):
        name, _, to_hf = table[_leaf_key(leaf_path)]
        leaf = params
        for p in leaf_path:
            leaf = leaf[p]
        stacked = "{i}" in name
        one = jax.ShapeDtypeStruct(leaf.shape[1:] if stacked else leaf.shape, leaf.dtype)
        shape = jax.eval_shape(to_hf, one)  # header first, without materialising anything
        if stacked:
            for i in range(cfg.num_layers):
                tensors.append(("model." + name.format(i=i), shape, lambda leaf=leaf, i=i: to_hf(np.asarray(leaf[i]))))
        else:
            tensors.append(("model." + name, shape, lambda leaf=leaf: to_hf(np.asarray(leaf))))

    map_schema(collect, cfg)
    _write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    return path


def _write_safetensors(file: Path, tensors: list[tuple[str, jax.ShapeDtypeStruct, Callable[[], np.ndarray]]]) -> None:
    """Stream tensors to `file` one at a time; only one tensor is ever materialised on the host."""
    header, offset = {}, 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(shape.dtype)], "shape": list(shape.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for _, _, get in tensors:
                f.write(np.ascontiguousarray(get()).tobytes())
        os.replace(tmp, file)  # never leave a half-written model.safetensors behind
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
