"""The float32 tolerance of the golden tests, derived from each fixture's own float32 noise floor.

`exact_logits` is a float64 numpy transcription of the Gemma 2 / 3 numerics as HF transformers implements
them (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma2 and .../gemma3):
it reads the fixture's config.json and model.safetensors directly, shares no code with our JAX model, and in
float64 its own rounding (~1e-13 on these logits) is negligible, so it stands for the exact math.
tests/make_fixtures.py holds the same transcription (`spec_forward`) and stores its gap to transformers in
golden.json as `max_abs_diff_f32_vs_spec_f64`; `f32_tolerance` recomputes that gap and the test checks the two
agree, so the copies cannot drift apart.
Why not our own forward run in float64 (jax enable_x64): model/forward.py does its norms, RoPE and attention
scores in float32 by design, so it cannot run in float64, and a reference that shares no code cannot share a
bug with the code under test.

The tolerance (see tests/test_golden.py for the measurements behind the constants):

    hf_err = max over the fixture's prompts of max |HF float32 logits - exact float64 logits|
    tol    = NOISE_FACTOR * hf_err

hf_err is how far transformers' own float32 run is from the exact math: a fixed property of the stored
fixture (its weights and its golden logits), the same on every CPU. Our float32 forward does the same
operations on the same values, so its rounding error has the same scale, and
|ours - HF| <= |ours - exact| + |HF - exact|.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

NOISE_FACTOR = 10.0  # tol = NOISE_FACTOR * HF's own float32 error on the fixture
MUTATION_MARGIN = 100.0  # a mutated model must miss the golden logits by more than this many tolerances
SLIDING = "sliding_attention"


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _rope(x: np.ndarray, base: float, scale: float) -> np.ndarray:  # x [T, N, H]; half-split (rotate_half) layout
    h = x.shape[-1]
    angles = np.arange(x.shape[0])[:, None] / scale / base ** (np.arange(0, h, 2) / h)  # [T, H/2]
    cos, sin = np.cos(np.tile(angles, 2))[:, None], np.sin(np.tile(angles, 2))[:, None]
    return x * cos + np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1) * sin


def _rope_of(hf: dict, layer_type: str) -> tuple[float, float]:
    rp = hf["rope_parameters"].get(layer_type, hf["rope_parameters"])  # Gemma 3 keys by layer type
    return rp["rope_theta"], rp.get("factor", 1.0) if rp.get("rope_type") == "linear" else 1.0


def exact_logits(checkpoint: Path, tokens: np.ndarray) -> np.ndarray:
    """[T, V] float64 logits of one unpadded row (transformers 5.x config.json with `rope_parameters`)."""
    hf = json.loads((checkpoint / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(checkpoint / "model.safetensors").items()}
    t, d, n, k, h, eps = (len(tokens), hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
                          hf["head_dim"], hf["rms_norm_eps"])
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    x = w["model.embed_tokens.weight"][tokens] * np.sqrt(d)
    for layer, kind in enumerate(hf["layer_types"]):
        p = {key[len(f"model.layers.{layer}."):]: v for key, v in w.items() if key.startswith(f"model.layers.{layer}.")}
        a = _rms(x, p["input_layernorm.weight"], eps)
        q = (a @ p["self_attn.q_proj.weight"].T).reshape(t, n, h)
        kk = (a @ p["self_attn.k_proj.weight"].T).reshape(t, k, h)
        v = np.repeat((a @ p["self_attn.v_proj.weight"].T).reshape(t, k, h), n // k, axis=1)  # [T, N, H]
        if "self_attn.q_norm.weight" in p:
            q, kk = _rms(q, p["self_attn.q_norm.weight"], eps), _rms(kk, p["self_attn.k_norm.weight"], eps)
        q, kk = _rope(q, *_rope_of(hf, kind)), np.repeat(_rope(kk, *_rope_of(hf, kind)), n // k, axis=1)
        s = np.einsum("tnh,snh->nts", q, kk) * hf["query_pre_attn_scalar"] ** -0.5
        if hf.get("attn_logit_softcapping"):
            s = hf["attn_logit_softcapping"] * np.tanh(s / hf["attn_logit_softcapping"])
        visible = (j <= i) & ((i - j < hf["sliding_window"]) if kind == SLIDING else True)
        s = np.exp(np.where(visible, s, -np.inf) - s.max(-1, keepdims=True))
        o = np.einsum("nts,snh->tnh", s / s.sum(-1, keepdims=True), v).reshape(t, n * h)
        x = x + _rms(o @ p["self_attn.o_proj.weight"].T, p["post_attention_layernorm.weight"], eps)
        a = _rms(x, p["pre_feedforward_layernorm.weight"], eps)
        g = a @ p["mlp.gate_proj.weight"].T
        g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))  # tanh-approximate GELU
        m = (g * (a @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
        x = x + _rms(m, p["post_feedforward_layernorm.weight"], eps)
    logits = _rms(x, w["model.norm.weight"], eps) @ w["model.embed_tokens.weight"].T
    cap = hf.get("final_logit_softcapping")
    return cap * np.tanh(logits / cap) if cap else logits


@dataclass(frozen=True)
class Tolerance:
    tol: float  # NOISE_FACTOR * hf_err: the float32 tolerance on max abs logit error
    hf_err: float  # max |HF float32 - exact float64| over the fixture's prompts
    hf_err_stored: float  # the same number as make_fixtures.py recorded it in golden.json
    exact: tuple[np.ndarray, ...]  # float64 logits per prompt


@functools.cache
def f32_tolerance(fixture: Path) -> Tolerance:
    golden = np.load(fixture / "golden.npz")
    n = len([k for k in golden.files if k.startswith("tokens_")])
    exact = tuple(exact_logits(fixture, golden[f"tokens_{i}"]) for i in range(n))
    hf_err = max(float(np.abs(golden[f"logits_{i}"] - e).max()) for i, e in enumerate(exact))
    cases = json.loads((fixture / "golden.json").read_text())["cases"]
    stored = max(c["max_abs_diff_f32_vs_spec_f64"] for c in cases)
    return Tolerance(NOISE_FACTOR * hf_err, hf_err, stored, exact)
