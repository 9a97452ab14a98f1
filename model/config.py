"""Gemma 2 / Gemma 3 text configuration: one frozen dataclass, presets, and config.json read and write.

The dataclass is hashable so it can be passed to `jax.jit` as a static argument. Everything a forward pass
needs is here; nothing is read from a global.

Where the values come from (public sources):
- config.json keys and their defaults: transformers' `Gemma2Config` and `Gemma3TextConfig`,
  https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma2/configuration_gemma2.py
  https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/configuration_gemma3.py
- the presets: each model's released config.json (e.g. https://huggingface.co/google/gemma-2-2b,
  https://huggingface.co/google/gemma-3-270m), the Gemma 2 report (https://arxiv.org/abs/2408.00118) and the
  Gemma 3 report (https://arxiv.org/abs/2503.19786).
- Gemma 2: local (sliding-window 4096) and global attention alternate, layer 0 local; attention logits are
  soft-capped at 50 and final logits at 30; rope base 10k everywhere.
- Gemma 3: five local layers then one global (layer i global iff (i + 1) % 6 == 0), no soft-caps, RMSNorm on
  q and k over the head dim; rope base 1M on global layers (4B and up: positions divided by 8, "linear"
  scaling) and 10k on local ones; sliding window 512 (270M, 1B) or 1024 (4B and up).
- scores are scaled by query_pre_attn_scalar**-0.5, which is head_dim except for the 27B models (D / N).

`config_from_hf` reads a checkpoint's own config.json, which always wins over a preset (an old converter wrote
query_pre_attn_scalar=224 for 9B; the file says so). `config_to_hf` is the one place that spells out the
config.json keys we write; `save_config` writes it (used by the checkpoint saver and the GGUF importer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Shape and numerics of one Gemma text model.

    Letters: L layers, D model, F mlp, N heads, K kv heads, H head dim, V vocab.
    """

    name: str = dataclasses.field(compare=False)  # a label only: two configs that differ by name compile once
    arch: str  # "gemma2" or "gemma3"
    vocab_size: int  # V
    num_layers: int  # L
    embed_dim: int  # D
    hidden_dim: int  # F
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    query_pre_attn_scalar: float  # scores are scaled by qpas**-0.5 (27B: D/N, not H)
    sliding_window: int  # W: key j visible to query i iff 0 <= i - j < W on sliding layers
    layer_types: tuple[str, ...]  # SLIDING or GLOBAL per layer
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    rope_scale_global: float = 1.0  # linear scaling: angles divided by this (Gemma 3 4B+: 8)
    attn_softcap: float | None = None  # Gemma 2: 50
    final_softcap: float | None = None  # Gemma 2: 30
    rms_eps: float = 1e-6
    use_qk_norm: bool = False  # Gemma 3 normalises q and k over H before RoPE
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2

    def __post_init__(self):
        if self.arch not in ("gemma2", "gemma3"):
            raise ValueError(f"arch must be 'gemma2' or 'gemma3', got {self.arch!r}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}")
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; expected {SLIDING!r} or {GLOBAL!r}")
        sizes = ("vocab_size", "num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")
        small = [f"{n} {getattr(self, n)}" for n in sizes if getattr(self, n) < 1]
        if small:
            raise ValueError(f"model sizes must be >= 1, got {', '.join(small)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def group_size(self) -> int:  # G = N / K query heads per kv head
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + 4 * d + (2 * h if self.use_qk_norm else 0)
        return self.vocab_size * d + d + self.num_layers * per_layer


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
    # Gemma 2: even layers are sliding, odd layers global (swapping them is a classic bug).
    return tuple(SLIDING if i % 2 == 0 else GLOBAL for i in range(num_layers))


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    # Gemma 3: five local layers then one global: layer i is global iff (i + 1) % 6 == 0.
    return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _gemma2(name, layers, d, f, n, k, h, qpas) -> GemmaConfig:
    return GemmaConfig(
        name=name, arch="gemma2", vocab_size=256_000, num_layers=layers, embed_dim=d, hidden_dim=f,
        num_heads=n, num_kv_heads=k, head_dim=h, query_pre_attn_scalar=qpas, sliding_window=4096,
        layer_types=gemma2_layer_types(layers), attn_softcap=50.0, final_softcap=30.0,
    )


def _gemma3(name, layers, d, f, n, k, window, vocab=262_144, scale=1.0) -> GemmaConfig:
    return GemmaConfig(
        name=name, arch="gemma3", vocab_size=vocab, num_layers=layers, embed_dim=d, hidden_dim=f,
        num_heads=n, num_kv_heads=k, head_dim=256, query_pre_attn_scalar=256, sliding_window=window,
        layer_types=gemma3_layer_types(layers), rope_base_global=1_000_000.0, rope_base_local=10_000.0,
        rope_scale_global=scale, use_qk_norm=True,
    )


PRESETS: dict[str, GemmaConfig] = {
    c.name: c
    for c in (
        _gemma2("gemma2-2b", 26, 2304, 9216, 8, 4, 256, 256),
        _gemma2("gemma2-9b", 42, 3584, 14336, 16, 8, 256, 256),
        _gemma2("gemma2-27b", 46, 4608, 36864, 32, 16, 128, 144),  # 27B: qpas = D / N
        _gemma3("gemma3-270m", 18, 640, 2048, 4, 1, 512),
        _gemma3("gemma3-1b", 26, 1152, 6912, 4, 1, 512),
        _gemma3("gemma3-4b", 34, 2560, 10240, 8, 4, 1024, vocab=262_208, scale=8.0),
    )
}


def get_preset(name: str) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def tiny_config(arch: str = "gemma2", **overrides: Any) -> GemmaConfig:
    """A few-layer random-weight config for tests and the learning smoke test."""
    layers = overrides.pop("num_layers", 4 if arch == "gemma2" else 6)
    types = gemma2_layer_types(layers) if arch == "gemma2" else gemma3_layer_types(layers)
    base = dict(
        name=f"tiny-{arch}", arch=arch, vocab_size=256, num_layers=layers, embed_dim=64, hidden_dim=128,
        num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=types,
    )
    if arch == "gemma2":
        base.update(attn_softcap=50.0, final_softcap=30.0)
    else:
        base.update(use_qk_norm=True, rope_base_global=1_000_000.0)
    base.update(overrides)
    return GemmaConfig(**base)


# --- config.json ------------------------------------------------------------------------------------------------

_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# transformers' Gemma2Config / Gemma3TextConfig defaults for the keys a config.json may leave out (multimodal
# text_configs list only what differs from them): a missing key means what it means to transformers. The sizes
# (hidden_size, intermediate_size, num_hidden_layers) stay required: a file without them is broken.
_HF_DEFAULTS = {
    "gemma2": {"vocab_size": 256_000, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None},
}


def named_config(name: str) -> GemmaConfig:
    """A preset by name (PRESETS), or tiny-gemma2 / tiny-gemma3 (tiny_config); ValueError when unknown."""
    tiny = ("tiny-gemma2", "tiny-gemma3")
    if name not in (*PRESETS, *tiny):  # the list a user may pick from: the tiny ones are accepted too
        raise ValueError(f"unknown preset {name!r}; known: {', '.join([*sorted(PRESETS), *tiny])}")
    return tiny_config(name.removeprefix("tiny-")) if name in tiny else get_preset(name)


def _rope_bases(hf: dict, arch: str) -> tuple[float, float, float]:
    """(global base, local base, global linear scale) from 4.x keys or 5.x `rope_parameters`."""
    default_global = 10_000.0 if arch == "gemma2" else 1_000_000.0
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:  # transformers 5.x, keyed by layer type
        g, loc = params[GLOBAL] or {}, params.get(SLIDING) or {}
        _linear_scale(loc)  # a scaled local rope is as unsupported as any other kind
        base_g = float(g.get("rope_theta", default_global))
        return base_g, float(loc.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))), _linear_scale(g)
    if isinstance(params, dict):  # transformers 5.x, one set for all layers
        base_g = float(params.get("rope_theta", hf.get("rope_theta", default_global)))
        scale = _linear_scale(params)
    else:
        base_g = float(hf.get("rope_theta", default_global))
        scale = _linear_scale(hf.get("rope_scaling") or {})
    local = float(hf.get("rope_local_base_freq", 10_000.0)) if arch == "gemma3" else base_g
    return base_g, local, scale


def _linear_scale(rope: dict) -> float:
    """The position scale of a rope dict: 1 for the default rope, `factor` for linear; other kinds are refused."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear)")
    return float(rope.get("factor", 1.0)) if kind == "linear" else 1.0


def _layer_types(hf: dict, arch: str, layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        types = tuple(hf["layer_types"])
        if len(types) != layers:
            raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers={layers}")
        return types
    if arch == "gemma2":
        return gemma2_layer_types(layers)
    return gemma3_layer_types(layers, int(hf.get("sliding_window_pattern", 6)))


def config_from_hf(hf: dict, name: str = "checkpoint") -> GemmaConfig:
    """Build a GemmaConfig from a parsed HF `config.json` (transformers 4.x or 5.x key style)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text tower
        text = hf["text_config"] or {}  # null: transformers' defaults, as for any key left out
        if not isinstance(text, dict):
            raise ValueError(f"config.json: text_config must be a JSON object, got {type(text).__name__}")
        hf = {**text, "model_type": "gemma3_text"}
    model_type = hf.get("model_type")
    if model_type not in _ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {sorted(_ARCHS)}")
    arch = _ARCHS[model_type]
    if hf.get("tie_word_embeddings") is False:  # the loader would leave lm_head.weight out
        raise ValueError("config.json: tie_word_embeddings is false; an untied lm_head is not supported (Gemma "
                         "unembeds with its embedding)")
    hf = {**_HF_DEFAULTS[arch], **hf}
    try:
        layers = int(hf["num_hidden_layers"])
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or d // heads)
        base_g, base_l, scale = _rope_bases(hf, arch)
        return GemmaConfig(
            name=name, arch=arch, vocab_size=int(hf["vocab_size"]), num_layers=layers, embed_dim=d,
            hidden_dim=int(hf["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(hf["num_key_value_heads"]), head_dim=head_dim,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
            sliding_window=int(hf.get("sliding_window") or 4096),
            layer_types=_layer_types(hf, arch, layers),
            rope_base_global=base_g, rope_base_local=base_l, rope_scale_global=scale,
            attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)), use_qk_norm=arch == "gemma3",
            pad_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0),
            eos_id=_first_id(hf.get("eos_token_id"), 1), bos_id=_first_id(hf.get("bos_token_id"), 2),
        )
    except KeyError as e:
        raise ValueError(f"config.json is missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # text or a list where a number goes, a bad rope dict
        raise ValueError(f"config.json: {e}") from None


def _first_id(value, default: int) -> int:
    if value is None:
        return default
    return int(value[0]) if isinstance(value, list) else int(value)


def config_to_hf(cfg: GemmaConfig, *, max_position_embeddings: int = 32768, torch_dtype: str = "float32") -> dict:
    """The transformers-style config.json for `cfg` (4.x keys, which 5.x also reads).

    The two keyword arguments are facts about a file, not about the architecture: the context length the
    source declared and the dtype the weights are stored in (transformers' `dtype="auto"` reads it).
    """
    gemma3 = cfg.arch == "gemma3"
    out = {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": "gemma3_text" if gemma3 else "gemma2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        # transformers 5 insists on an int here; the value is integral for every released model.
        "query_pre_attn_scalar": _int_if_integral(cfg.query_pre_attn_scalar), "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types), "rope_theta": cfg.rope_base_global,
        "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
        "rms_norm_eps": cfg.rms_eps, "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id,
        "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": max_position_embeddings,
        "torch_dtype": torch_dtype,
    }
    if gemma3:
        out["rope_local_base_freq"] = cfg.rope_base_local
        linear = {"rope_type": "linear", "factor": cfg.rope_scale_global}
        out["rope_scaling"] = linear if cfg.rope_scale_global != 1 else None
    return out


def _int_if_integral(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def save_config(directory: str | Path, cfg: GemmaConfig, **kwargs: Any) -> Path:
    """Write `directory/config.json` for `cfg`; kwargs go to `config_to_hf`. Returns the file."""
    file = Path(directory) / "config.json"
    file.write_text(json.dumps(config_to_hf(cfg, **kwargs), indent=2) + "\n")
    return file


def load_config(path: str | Path) -> GemmaConfig:
    """The GemmaConfig of a checkpoint directory (its config.json) or of a config.json file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        hint = ""
        if (path / "status.json").is_file() or (path / "commit_success.txt").is_file() or path.name == "checkpoints":
            hint = (" (that is a bin/train run or its checkpoints: its models are the run's final_hf/ and best_hf/; "
                    "a paused run writes final_hf/ when it finishes, e.g. re-run it with --steps at its last step)")
        raise FileNotFoundError(f"no config.json at {file}{hint}")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    return config_from_hf(hf, name=path.name)
