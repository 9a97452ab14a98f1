"""Golden-value fixtures for our JAX Gemma: tiny RANDOM HF Gemma 2 / Gemma 3 text checkpoints and their outputs.

Run by hand; the test suite only READS what this writes and never needs torch. Needs the `reference` extra
(`pip install -e '.[reference]'`: torch + transformers):

    python tests/make_fixtures.py                  # (re)write tests/fixtures/<name>/ for every model
    python tests/make_fixtures.py --models gemma2_g2 --out /tmp/fx
    python tests/make_fixtures.py --roundtrip      # our loader -> our saver -> transformers; our forward; vs golden

The reference is HF transformers with attn_implementation="eager" in float32 (sdpa/flash skip the attention
soft-cap). Weights come from numpy (seeded per model), not torch's RNG. As an independent check every golden
row is also recomputed by `spec_forward`, a float64 numpy transcription of the Gemma 2/3 numerics as HF
transformers implements them (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma2
and .../gemma3), sharing no code with transformers or our model; its gap to transformers is transformers' own
float32 error, recorded per case in golden.json as `max_abs_diff_f32_vs_spec_f64` (~1e-5 .. 7e-5 here: logits
are ~25 and the attention is peaky, so float32 rounding grows a few x per layer). The transcription lives
in tests/golden_tolerance.py, which also recomputes that gap and sets the float32 tolerance of
tests/test_golden.py to 10x it.

Models (FIXTURES below):
    gemma2_g2  Gemma 2, 4 layers, G=2, qpas 24 != head_dim 16, window 6, soft-caps 50 / 30 that both bend
    gemma2_g4  Gemma 2, 4 layers, G=4 (8 heads, 2 kv), head_dim 8 = qpas, window 4, a bos-only prompt (T=1)
    gemma3_g4  Gemma 3, 7 layers (layer 5 global, 6 local again), K=1, q/k norms, global rope 1e6 with linear
               scaling 8, local rope 1e4, window 6
    gemma3_g2  Gemma 3, 6 layers (layer 5 global), G=2, qpas 20 != head_dim 16, no rope scaling, window 5
Every RMSNorm weight (the zero-centred (1 + w) ones, q/k norms included) is random and nonzero, so a model
that drops the `1 +` fails. Embeddings are small and post-norms large so the layers, not the input token,
decide the next token (otherwise a random model just repeats its last token and greedy tests prove little).

Each fixture dir tests/fixtures/<name>/ holds:
    config.json, model.safetensors   HF checkpoint from save_pretrained(safe_serialization=True); transformers
                                     5.x writes rope settings as `rope_parameters` (Gemma 3: keyed by layer
                                     type) and lists `layer_types` explicitly
    golden.npz                       arrays below, i = 0 .. P-1 (P = 3 prompts of different lengths)
    golden.json                      transformers/torch versions, config, init, and per case the measured
                                     numbers (max |pre-cap score|, max |logit|, greedy agreement, gaps)

golden.npz keys:
    tokens_<i>          int32   [T_i]       the prompt; tokens_<i>[0] == 2 (bos), the rest random ids in [4, V)
    logits_<i>          float32 [T_i, V]    eager float32 logits of that prompt ALONE (batch 1, no padding),
                                            after the final soft-cap where the model has one
    logits_bf16_<i>     float32 [T_i, V]    the same model cast to bfloat16 (weights + activations), upcast
    greedy_<i>          int32   [12]        model.generate(tokens_<i>[None], max_new_tokens=12, do_sample=False)
                                            with eos disabled: the 12 new tokens only (KV-cached decode)
    greedy_nocache_<i>  int32   [12]        argmax loop re-running the whole sequence each step (no cache);
                                            golden.json says whether it equals greedy_<i>, and the smallest
                                            top1 - top2 logit margin on the way (how robust the argmax is)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from golden_tolerance import exact_logits, f32_tolerance

try:
    import torch
    import transformers
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3
except ImportError as e:  # the suite never imports this file; only a person regenerating fixtures runs it
    raise SystemExit(f"make_fixtures needs torch + transformers (pip install -e '.[reference]'): {e}") from None

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures"
BOS, FIRST_FREE_ID = 2, 4  # ids 0..3 are pad, eos, bos, unk: prompts use none of them after the bos
NEW_TOKENS = 12
SPEC_TOL = 1e-3  # transformers vs the float64 spec transcription: above this the two disagree on semantics
SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One tiny model: HF config kwargs, the scale of its random weights, its prompt lengths."""

    name: str
    arch: str  # "gemma2" or "gemma3"
    seed: int
    config: dict
    prompt_lengths: tuple[int, ...]
    qk_gain: float  # q_proj / k_proj ~ N(0, (gain / sqrt(fan_in))^2): Gemma 2 scores grow with gain^2
    proj_gain: float  # every other Linear, same form
    embed_std: float
    post_norm_mean: float  # post-attn / post-ffw norm w ~ N(mean, 0.4^2): layer outputs outweigh the embedding
    final_norm_mean: float  # final norm w ~ N(mean, 0.25^2): (1 + w) sets the logit scale
    description: str


def _gemma2(**kw) -> dict:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-6, pad_token_id=0,
                eos_token_id=1, bos_token_id=2, max_position_embeddings=128, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    base.update(kw)
    # Gemma 2: even layers sliding, odd global (written out so the file says it, not a default).
    base["layer_types"] = [SLIDING if i % 2 == 0 else GLOBAL for i in range(base["num_hidden_layers"])]
    return base


def _gemma3(rope_scale: float | None, **kw) -> dict:
    full = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if rope_scale is not None:  # Gemma 3 4B+: global-layer angles divided by 8
        full = {"rope_type": "linear", "factor": rope_scale, "rope_theta": 1_000_000.0}
    base = dict(vocab_size=256, hidden_size=48, intermediate_size=96, rms_norm_eps=1e-6, pad_token_id=0,
                eos_token_id=1, bos_token_id=2, max_position_embeddings=128,
                rope_parameters={GLOBAL: full, SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}})
    base.update(kw)
    # Gemma 3: layer i global iff (i + 1) % 6 == 0.
    base["layer_types"] = [GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(base["num_hidden_layers"])]
    return base


FIXTURES = (
    Fixture(
        "gemma2_g2", "gemma2", 1002,
        _gemma2(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=24, sliding_window=6),
        (5, 11, 17), qk_gain=2.2, proj_gain=1.0, embed_std=0.1, post_norm_mean=0.5, final_norm_mean=8.0,
        description="Gemma 2, G=2, qpas 24 != head_dim 16, window 6, attention soft-cap 50 and final soft-cap 30 "
                    "both bend values",
    ),
    Fixture(
        "gemma2_g4", "gemma2", 1004,
        _gemma2(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                query_pre_attn_scalar=8, sliding_window=4),
        (1, 8, 13), qk_gain=1.9, proj_gain=1.0, embed_std=0.1, post_norm_mean=1.0, final_norm_mean=7.0,
        description="Gemma 2, G=4 (8 heads, 2 kv), head_dim 8 = qpas, window 4, a 1-token (bos only) prompt",
    ),
    Fixture(
        "gemma3_g4", "gemma3", 3004,
        _gemma3(8.0, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                query_pre_attn_scalar=16, sliding_window=6, vocab_size=384),
        (5, 11, 17), qk_gain=1.0, proj_gain=1.0, embed_std=0.1, post_norm_mean=0.5, final_norm_mean=4.0,
        description="Gemma 3 text, 7 layers (layer 5 global), K=1, q/k norms, global rope 1e6 with linear scaling 8, "
                    "local rope 1e4, window 6",
    ),
    Fixture(
        "gemma3_g2", "gemma3", 3002,
        _gemma3(None, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=20, sliding_window=5),
        (6, 12, 19), qk_gain=1.0, proj_gain=1.0, embed_std=0.1, post_norm_mean=0.5, final_norm_mean=4.0,
        description="Gemma 3 text, 6 layers (layer 5 global), G=2, qpas 20 != head_dim 16, no rope scaling, window 5",
    ),
)


# --- building -----------------------------------------------------------------------------------------------------


def _init_value(name: str, shape: tuple[int, ...], fx: Fixture, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("embed_tokens.weight"):
        return rng.normal(0.0, fx.embed_std, shape)
    if name == "model.norm.weight":
        return rng.normal(fx.final_norm_mean, 0.25, shape)
    if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
        return rng.normal(fx.post_norm_mean, 0.4, shape)
    if "norm" in name:  # zero-centred (1 + w): nonzero w so a missing `1 +` shows
        return rng.normal(0.2, 0.4, shape)
    if len(shape) == 2:  # Linear [out, in]
        gain = fx.qk_gain if name.endswith(("q_proj.weight", "k_proj.weight")) else fx.proj_gain
        return rng.normal(0.0, gain / np.sqrt(shape[1]), shape)
    raise ValueError(f"no init rule for parameter {name} with shape {shape}")


def build_model(fx: Fixture) -> torch.nn.Module:
    """The float32 eager HF model with every parameter drawn in name order from numpy (deterministic)."""
    cfg_cls, model_cls = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                          "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[fx.arch]
    config = cfg_cls(**fx.config, attn_implementation="eager", tie_word_embeddings=True)
    model = model_cls(config).to(torch.float32).eval()
    rng = np.random.default_rng(fx.seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            value = _init_value(name, tuple(params[name].shape), fx, rng)
            params[name].copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def prompts(fx: Fixture) -> list[np.ndarray]:
    rng = np.random.default_rng(fx.seed + 1)
    vocab = fx.config["vocab_size"]
    return [np.concatenate([[BOS], rng.integers(FIRST_FREE_ID, vocab, n - 1)]).astype(np.int32)
            for n in fx.prompt_lengths]


# --- the independent float64 reference: tests/golden_tolerance.py (shared with the suite's tolerance) --------


def spec_forward(checkpoint: Path, tokens: np.ndarray) -> np.ndarray:
    return exact_logits(checkpoint, tokens)


# --- measuring transformers ---------------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    return model(input_ids=ids, use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def precap_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """Logits BEFORE the final soft-cap: the base model's hidden states times the tied embedding."""
    hidden = model.model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None], use_cache=False)
    return model.lm_head(hidden.last_hidden_state)[0].numpy()


class ScoreProbe:
    """Wraps the eager attention function to record the largest |q.k * scale| before the cap, over visible keys."""

    def __init__(self, module):
        self.module, self.original, self.max_abs = module, module.eager_attention_forward, 0.0

    def __enter__(self):
        def probe(mod, query, key, value, attention_mask, scaling=None, **kw):
            keys = modeling_gemma2.repeat_kv(key, mod.num_key_value_groups)
            scores = torch.matmul(query, keys.transpose(2, 3)) * scaling  # [B, N, T, S]
            t, s = scores.shape[-2:]
            visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # causal, if no mask is passed
            if attention_mask is not None:
                visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            self.max_abs = max(self.max_abs, float(scores.abs().masked_fill(~visible, 0).max()))
            return self.original(mod, query, key, value, attention_mask, scaling=scaling, **kw)

        self.module.eager_attention_forward = probe
        return self

    def __exit__(self, *exc):
        self.module.eager_attention_forward = self.original


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    # eos disabled (None, with min_new_tokens as a guard) so every prompt decodes 12 steps, past the window.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    new = out[0, len(tokens):].numpy().astype(np.int32)
    if len(new) != NEW_TOKENS:
        raise RuntimeError(f"generate returned {len(new)} new tokens, expected {NEW_TOKENS}")
    return new


def greedy_nocache(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, float]:
    """Argmax loop re-running the whole sequence each step; also the smallest top1 - top2 margin."""
    seq, margin = list(tokens), np.inf
    for _ in range(NEW_TOKENS):
        last = logits_of(model, np.array(seq))[-1]
        top2 = np.sort(last)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        seq.append(int(np.argmax(last)))
    return np.array(seq[len(tokens):], dtype=np.int32), margin


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _case(fx: Fixture, model, bf16, checkpoint: Path, i: int, tokens: np.ndarray) -> tuple[dict, dict]:
    """The npz arrays and the golden.json record of prompt i."""
    logits = logits_of(model, tokens)
    with ScoreProbe(modeling_gemma2 if fx.arch == "gemma2" else modeling_gemma3) as probe:
        if not np.array_equal(logits_of(model, tokens), logits):
            raise RuntimeError("the score probe changed the logits")
    raw = precap_logits(model, tokens)
    greedy, (nocache, margin) = greedy_generate(model, tokens), greedy_nocache(model, tokens)
    arrays = {f"tokens_{i}": tokens, f"logits_{i}": logits, f"logits_bf16_{i}": logits_of(bf16, tokens),
              f"greedy_{i}": greedy, f"greedy_nocache_{i}": nocache}
    spec_gap = _max_diff(spec_forward(checkpoint, tokens), logits)
    if spec_gap > SPEC_TOL:
        raise RuntimeError(f"{fx.name} prompt {i}: transformers and the spec transcription differ by {spec_gap:.2e}")
    record = {
        "index": i, "length": len(tokens),
        "description": f"bos + {len(tokens) - 1} random ids in [{FIRST_FREE_ID}, {fx.config['vocab_size']}); "
                       f"logits of the row alone; {NEW_TOKENS} greedy tokens",
        "max_abs_precap_score": probe.max_abs, "max_abs_precap_logit": float(np.abs(raw).max()),
        "max_abs_logit": float(np.abs(logits).max()),
        "final_softcap_bends": bool(fx.config.get("final_logit_softcapping") and _max_diff(raw, logits) > 1e-3),
        "greedy_equals_nocache_argmax": bool(np.array_equal(greedy, nocache)), "min_greedy_margin": margin,
        "distinct_greedy_tokens": len(set(greedy.tolist())),
        "max_abs_diff_bf16_vs_f32": _max_diff(arrays[f"logits_bf16_{i}"], logits),
        "max_abs_diff_f32_vs_spec_f64": spec_gap,
    }
    return arrays, record


def make_fixture(fx: Fixture, out_dir: Path) -> dict:
    model = build_model(fx)
    out = out_dir / fx.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    bf16 = build_model(fx).to(torch.bfloat16)
    arrays, cases = {}, []
    for i, tokens in enumerate(prompts(fx)):
        case_arrays, record = _case(fx, model, bf16, out, i, tokens)
        arrays.update(case_arrays)
        cases.append(record)
    np.savez_compressed(out / "golden.npz", **arrays)
    meta = {
        "name": fx.name, "description": fx.description, "transformers": transformers.__version__,
        "torch": torch.__version__, "attn_implementation": "eager", "dtype": "float32", "seed": fx.seed,
        "init": {"qk_gain": fx.qk_gain, "proj_gain": fx.proj_gain, "embed_std": fx.embed_std,
                 "post_norm_mean": fx.post_norm_mean, "final_norm_mean": fx.final_norm_mean,
                 "other_norms": "w ~ N(0.2, 0.4^2)"},
        "config": fx.config, "new_tokens": NEW_TOKENS, "npz_keys": sorted(arrays), "cases": cases,
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def print_summary(metas: list[dict]) -> None:
    print(f"{'model':<10} {'max|score|':>10} {'max|raw logit|':>14} {'max|logit|':>10} {'attn cap':>8} "
          f"{'final cap':>9} {'greedy==nocache':>15} {'min margin':>10} {'distinct':>8} {'bf16 gap':>8} "
          f"{'spec gap':>8}")
    for m in metas:
        c, cfg = m["cases"], m["config"]
        score = max(x["max_abs_precap_score"] for x in c)
        attn = "n/a" if cfg.get("attn_logit_softcapping") is None else ("yes" if score > 20 else "NO")
        final = "n/a" if cfg.get("final_logit_softcapping") is None else \
            ("yes" if all(x["final_softcap_bends"] for x in c) else "NO")
        print(f"{m['name']:<10} {score:>10.2f} {max(x['max_abs_precap_logit'] for x in c):>14.2f} "
              f"{max(x['max_abs_logit'] for x in c):>10.2f} {attn:>8} {final:>9} "
              f"{str(all(x['greedy_equals_nocache_argmax'] for x in c)):>15} "
              f"{min(x['min_greedy_margin'] for x in c):>10.4f} {min(x['distinct_greedy_tokens'] for x in c):>8} "
              f"{max(x['max_abs_diff_bf16_vs_f32'] for x in c):>8.3f} "
              f"{max(x['max_abs_diff_f32_vs_spec_f64'] for x in c):>8.1e}")


# --- roundtrip ----------------------------------------------------------------------------------------------------


def _reload_with_transformers(cfg, params, ours) -> tuple[torch.nn.Module | None, str]:
    """Save with our saver to a temp dir and load that with transformers; (None, why) if it refuses."""
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_hf_checkpoint(tmp, cfg, params)
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                                   dtype=torch.float32)
        except Exception as e:  # report every fixture, not just the first refusal
            return None, f"{type(e).__name__}: {str(e).splitlines()[-1].strip() if str(e) else ''}"
    return hf.eval(), ""


def roundtrip(fixtures_dir: Path, names: list[str], tol: float | None) -> int:
    """Our loader -> our saver -> transformers, and our forward, each vs golden. Returns the exit code."""
    sys.path.insert(0, str(REPO))
    import jax.numpy as jnp

    import model as ours

    worst, failures = 0.0, 0  # worst: the largest difference as a multiple of its fixture's tolerance
    for name in names:
        path = fixtures_dir / name
        if not (path / "golden.npz").is_file():
            raise FileNotFoundError(f"no fixture at {path} (expected config.json, model.safetensors, golden.npz)")
        golden = np.load(path / "golden.npz")
        cfg, params = ours.load_hf_checkpoint(str(path), jnp.float32)
        hf, why = _reload_with_transformers(cfg, params, ours)
        if hf is None:
            failures += 1
            print(f"{name:<10} transformers cannot load our re-saved checkpoint: {why}")
        i = 0
        while f"tokens_{i}" in golden:
            tokens, want = golden[f"tokens_{i}"], golden[f"logits_{i}"]
            d_jax = _max_diff(np.asarray(ours.forward(params, jnp.asarray(tokens)[None], cfg))[0], want)
            d_hf = _max_diff(logits_of(hf, tokens), want) if hf is not None else float("nan")
            limit = tol if tol is not None else f32_tolerance(path).tol
            worst = max(worst, d_jax / limit, 0.0 if hf is None else d_hf / limit)
            print(f"{name:<10} prompt {i} (T={len(tokens):>2}): |HF(re-saved) - golden| = {d_hf:.2e}   "
                  f"|JAX - golden| = {d_jax:.2e}")
            i += 1
    ok = worst <= 1.0 and not failures
    print(f"worst {worst:.2f} x the tolerance, {failures} re-saved checkpoint(s) refused: "
          f"{'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory (default tests/fixtures)")
    parser.add_argument("--models", default=",".join(f.name for f in FIXTURES), help="comma-separated fixture names")
    parser.add_argument("--roundtrip", action="store_true", help="check our loader/saver/forward against the fixtures")
    parser.add_argument("--tol", type=float, default=None,
                        help="--roundtrip: max abs logit difference (default: each fixture's float32 tolerance, "
                             "as tests/test_golden.py uses)")
    args = parser.parse_args()
    known = {f.name: f for f in FIXTURES}
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown fixture(s) {unknown}; known: {sorted(known)}")
    torch.set_num_threads(int(os.environ.get("FIXTURE_THREADS", "1")))  # a shared 2-core box
    if args.roundtrip:
        try:
            return roundtrip(args.out, names, args.tol)
        except FileNotFoundError as e:
            parser.error(str(e))
    metas = [make_fixture(known[n], args.out) for n in names]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; wrote {args.out}")
    print_summary(metas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
