"""Golden-value fixtures for our JAX Gemma: tiny RANDOM HF Gemma 2 / Gemma 3 text checkpoints and their outputs.

Run by hand; the test suite only READS what this writes and never needs torch. Needs the `reference` extra
(`pip install torch==2.13.0 transformers`):

    python tests/make_fixtures.py                  # (re)write tests/fixtures/<name>/ for every model
    python tests/make_fixtures.py --models gemma2_g2 --out /tmp/fx
    python tests/make_fixtures.py --roundtrip      # our loader -> our saver -> transformers; our forward; vs golden

The reference is HF transformers with attn_implementation="eager" in float32 (sdpa/flash skip the attention
soft-cap). Weights are drawn from numpy (seeded per model), not torch, so they do not depend on torch's RNG.

Models (see FIXTURES below): gemma2_g2 (G=2, qpas 24 != head_dim 16, window 6, soft-caps 50/30 that actually
bend), gemma2_g4 (G=4, window 4, one 1-token prompt), gemma3_g4 (7 layers: layer 5 global, q/k norms, global
rope 1e6 with linear scaling 8, local 1e4, window 6, K=1), gemma3_g2 (no rope scaling, G=2, qpas 20 != 16).
Every RMSNorm weight (the zero-centred (1 + w) ones, q/k norms included) is random and nonzero, so a model
that drops the `1 +` fails.

Each fixture dir tests/fixtures/<name>/ holds:
    config.json, model.safetensors   HF checkpoint from save_pretrained(safe_serialization=True). transformers 5.x
                                     writes rope settings as `rope_parameters` keyed by layer type.
    golden.npz                       arrays below, i = 0 .. P-1 (P prompts of different lengths)
    golden.json                      transformers/torch versions, config summary, per-case notes and the
                                     measured numbers (max |pre-cap score|, max |logit|, bf16 and f64 gaps, ...)

golden.npz keys:
    tokens_<i>          int32   [T_i]       the prompt; tokens_<i>[0] == 2 (bos), the rest random ids in [4, V)
    logits_<i>          float32 [T_i, V]    eager float32 logits of that prompt ALONE (batch 1, no padding),
                                            after the final soft-cap where the model has one
    logits_bf16_<i>     float32 [T_i, V]    the same model cast to bfloat16 (weights + activations), upcast
    greedy_<i>          int32   [12]        model.generate(tokens_<i>[None], max_new_tokens=12, do_sample=False)
                                            with eos disabled: the 12 new tokens only (KV-cached decode)
    greedy_nocache_<i>  int32   [12]        argmax loop that re-runs the whole sequence each step (no cache);
                                            golden.json says whether it equals greedy_<i> and the smallest
                                            top1 - top2 logit margin seen on the way
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
ROUNDTRIP_TOL = 1e-4  # f32 logits: ours vs transformers, and transformers on our re-saved checkpoint vs golden
SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One tiny model: its HF config kwargs, how big its random weights are, and its prompt lengths."""

    name: str
    arch: str  # "gemma2" or "gemma3"
    seed: int
    config: dict
    prompt_lengths: tuple[int, ...]
    proj_gain: float  # linear weights ~ N(0, (gain / sqrt(fan_in))^2): large gain -> large attention scores
    embed_std: float
    post_norm_mean: float  # post-attn / post-ffw norm w ~ mean + N(0, 0.4^2): layer outputs vs the embedding
    final_norm_mean: float  # final-norm w ~ mean + N(0, 0.25^2): (1 + w) scales the logits up
    description: str


def _gemma2(**kw) -> dict:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-6,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10_000.0})
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
        (5, 11, 17), proj_gain=2.4, embed_std=0.5, post_norm_mean=0.2, final_norm_mean=0.5,
        description="Gemma 2, G=2, qpas 24 != head_dim 16, window 6, attention soft-cap 50 and final soft-cap 30 "
                    "both engaged",
    ),
    Fixture(
        "gemma2_g4", "gemma2", 1004,
        _gemma2(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                query_pre_attn_scalar=8, sliding_window=4),
        (1, 8, 13), proj_gain=2.4, embed_std=0.5, post_norm_mean=0.2, final_norm_mean=0.5,
        description="Gemma 2, G=4 (8 heads, 2 kv), head_dim 8 = qpas, window 4, a 1-token (bos only) prompt",
    ),
    Fixture(
        "gemma3_g4", "gemma3", 3004,
        _gemma3(8.0, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                query_pre_attn_scalar=16, sliding_window=6, vocab_size=384),
        (5, 11, 17), proj_gain=2.0, embed_std=0.5, post_norm_mean=0.2, final_norm_mean=0.5,
        description="Gemma 3 text, 7 layers (layer 5 global), K=1, q/k norms, global rope 1e6 with linear scaling 8, "
                    "local rope 1e4, window 6",
    ),
    Fixture(
        "gemma3_g2", "gemma3", 3002,
        _gemma3(None, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=20, sliding_window=5),
        (6, 12, 19), proj_gain=2.0, embed_std=0.5, post_norm_mean=0.2, final_norm_mean=0.5,
        description="Gemma 3 text, 6 layers (layer 5 global), G=2, qpas 20 != head_dim 16, no rope scaling, window 5",
    ),
)


# --- building -----------------------------------------------------------------------------------------------------


def _random_weights(model: torch.nn.Module, fx: Fixture) -> None:
    """Overwrite every parameter from a seeded numpy generator (in name order, so it is deterministic)."""
    rng = np.random.default_rng(fx.seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith("embed_tokens.weight"):
            value = rng.normal(0.0, fx.embed_std, p.shape)
        elif name == "model.norm.weight":
            value = fx.final_norm_mean + rng.normal(0.0, 0.25, p.shape)
        elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            value = rng.normal(fx.post_norm_mean, 0.4, p.shape)
        elif "norm" in name:  # zero-centred (1 + w): nonzero w so a missing `1 +` shows
            value = rng.normal(0.2, 0.4, p.shape)
        elif p.ndim == 2:  # Linear [out, in]
            value = rng.normal(0.0, fx.proj_gain / np.sqrt(p.shape[1]), p.shape)
        else:
            raise ValueError(f"no init rule for parameter {name} with shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(value.astype(np.float32)))


def build_model(fx: Fixture) -> torch.nn.Module:
    cfg_cls, model_cls = (Gemma2Config, Gemma2ForCausalLM) if fx.arch == "gemma2" else (Gemma3TextConfig,
                                                                                        Gemma3ForCausalLM)
    config = cfg_cls(**fx.config, attn_implementation="eager", tie_word_embeddings=True)
    torch.manual_seed(fx.seed)
    model = model_cls(config).to(torch.float32).eval()
    _random_weights(model, fx)
    return model


def prompts(fx: Fixture) -> list[np.ndarray]:
    rng = np.random.default_rng(fx.seed + 1)
    vocab = fx.config["vocab_size"]
    return [np.concatenate([[BOS], rng.integers(FIRST_FREE_ID, vocab, n - 1)]).astype(np.int32)
            for n in fx.prompt_lengths]


# --- measuring ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    return model(input_ids=ids, use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def precap_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """Logits BEFORE the final soft-cap: the base model's hidden states times the tied embedding."""
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return model.lm_head(hidden)[0].numpy()


class ScoreProbe:
    """Wraps the eager attention function to record the largest |q.k * scale| a query can actually see."""

    def __init__(self, module):
        self.module, self.original, self.max_abs = module, module.eager_attention_forward, 0.0

    def __enter__(self):
        def probe(mod, query, key, value, attention_mask, scaling=None, **kw):
            keys = modeling_gemma2.repeat_kv(key, mod.num_key_value_groups)
            scores = torch.matmul(query, keys.transpose(2, 3)) * scaling  # [B, N, T, S] pre-cap
            t, s = scores.shape[-2:]
            visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # causal fallback when no mask is passed
            if attention_mask is not None:
                visible = attention_mask == 0 if attention_mask.dtype != torch.bool else attention_mask
            self.max_abs = max(self.max_abs, float(scores.abs().masked_fill(~visible, 0).max()))
            return self.original(mod, query, key, value, attention_mask, scaling=scaling, **kw)

        self.module.eager_attention_forward = probe
        return self

    def __exit__(self, *exc):
        self.module.eager_attention_forward = self.original


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    # eos disabled (None, and min_new_tokens as a guard) so every row runs the full 12 steps past the window.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                         use_cache=True)
    new = out[0, len(tokens):].numpy().astype(np.int32)
    if len(new) != NEW_TOKENS:
        raise RuntimeError(f"generate returned {len(new)} new tokens, expected {NEW_TOKENS}")
    return new


@torch.no_grad()
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


def make_fixture(fx: Fixture, out_dir: Path) -> dict:
    model = build_model(fx)
    cap = model.config.final_logit_softcapping
    module = modeling_gemma2 if fx.arch == "gemma2" else modeling_gemma3
    arrays, cases = {}, []
    bf16 = build_model(fx).to(torch.bfloat16)
    f64 = build_model(fx).to(torch.float64)
    for i, tokens in enumerate(prompts(fx)):
        logits = logits_of(model, tokens)
        with ScoreProbe(module) as probe:
            probed = logits_of(model, tokens)
        if not np.array_equal(probed, logits):
            raise RuntimeError("score probe changed the logits")
        raw = precap_logits(model, tokens)
        greedy = greedy_generate(model, tokens)
        nocache, margin = greedy_nocache(model, tokens)
        arrays.update({f"tokens_{i}": tokens, f"logits_{i}": logits.astype(np.float32),
                       f"logits_bf16_{i}": logits_of(bf16, tokens).astype(np.float32), f"greedy_{i}": greedy,
                       f"greedy_nocache_{i}": nocache})
        cases.append({
            "index": i, "length": len(tokens),
            "description": f"bos + {len(tokens) - 1} random ids in [{FIRST_FREE_ID}, {fx.config['vocab_size']}), "
                           f"logits for the row alone; {NEW_TOKENS} greedy tokens",
            "max_abs_precap_score": probe.max_abs, "max_abs_precap_logit": float(np.abs(raw).max()),
            "max_abs_logit": float(np.abs(logits).max()),
            "final_softcap_bends": bool(cap is not None and _max_diff(raw, logits) > 1e-3),
            "greedy_equals_nocache_argmax": bool(np.array_equal(greedy, nocache)),
            "min_greedy_margin": margin,
            "max_abs_diff_bf16_vs_f32": _max_diff(arrays[f"logits_bf16_{i}"], logits),
            "max_abs_diff_f64_vs_f32": _max_diff(logits_of(f64, tokens), logits),
        })
    out = out_dir / fx.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    np.savez_compressed(out / "golden.npz", **arrays)
    meta = {
        "name": fx.name, "description": fx.description, "transformers": transformers.__version__,
        "torch": torch.__version__, "attn_implementation": "eager", "dtype": "float32", "seed": fx.seed,
        "init": {"proj_gain": fx.proj_gain, "embed_std": fx.embed_std, "final_norm_mean": fx.final_norm_mean,
                 "norm_w": "N(0.2, 0.4^2)"},
        "config": fx.config, "new_tokens": NEW_TOKENS, "npz_keys": sorted(arrays), "cases": cases,
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def print_summary(metas: list[dict]) -> None:
    head = f"{'model':<10} {'max|score|':>10} {'max|raw logit|':>14} {'max|logit|':>10} {'attn cap':>8} " \
           f"{'final cap':>9} {'greedy==nocache':>15} {'min margin':>10} {'bf16 gap':>9} {'f64 gap':>9}"
    print(head)
    for m in metas:
        c, cfg = m["cases"], m["config"]
        score = max(x["max_abs_precap_score"] for x in c)
        attn_cap = cfg.get("attn_logit_softcapping")
        engaged = "n/a" if attn_cap is None else ("yes" if score > 20 else "NO")
        final = "n/a" if cfg.get("final_logit_softcapping") is None else \
            ("yes" if all(x["final_softcap_bends"] for x in c) else "NO")
        print(f"{m['name']:<10} {score:>10.2f} {max(x['max_abs_precap_logit'] for x in c):>14.2f} "
              f"{max(x['max_abs_logit'] for x in c):>10.2f} {engaged:>8} {final:>9} "
              f"{str(all(x['greedy_equals_nocache_argmax'] for x in c)):>15} "
              f"{min(x['min_greedy_margin'] for x in c):>10.4f} "
              f"{max(x['max_abs_diff_bf16_vs_f32'] for x in c):>9.3f} "
              f"{max(x['max_abs_diff_f64_vs_f32'] for x in c):>9.2e}")


# --- roundtrip ----------------------------------------------------------------------------------------------------


def roundtrip(fixtures_dir: Path, names: list[str]) -> int:
    """Our loader -> our saver -> transformers, and our forward, each vs golden. Returns the exit code."""
    sys.path.insert(0, str(REPO))
    import jax.numpy as jnp

    import model as ours

    worst = 0.0
    for name in names:
        path = fixtures_dir / name
        if not (path / "golden.npz").is_file():
            raise FileNotFoundError(f"no fixture at {path} (expected config.json, model.safetensors, golden.npz)")
        golden = np.load(path / "golden.npz")
        cfg, params = ours.load_hf_checkpoint(str(path), jnp.float32)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_hf_checkpoint(tmp, cfg, params)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                                   dtype=torch.float32).eval()
            i = 0
            while f"tokens_{i}" in golden:
                tokens, want = golden[f"tokens_{i}"], golden[f"logits_{i}"]
                d_hf = _max_diff(logits_of(hf, tokens), want)
                d_jax = _max_diff(np.asarray(ours.forward(params, jnp.asarray(tokens)[None], cfg))[0], want)
                worst = max(worst, d_hf, d_jax)
                print(f"{name:<10} prompt {i} (T={len(tokens):>2}): |HF(re-saved) - golden| = {d_hf:.2e}   "
                      f"|JAX - golden| = {d_jax:.2e}")
                i += 1
    ok = worst <= ROUNDTRIP_TOL
    print(f"worst {worst:.2e} vs tolerance {ROUNDTRIP_TOL:.0e}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory (default tests/fixtures)")
    parser.add_argument("--models", default=",".join(f.name for f in FIXTURES), help="comma-separated fixture names")
    parser.add_argument("--roundtrip", action="store_true", help="check our loader/saver/forward against the fixtures")
    args = parser.parse_args()
    known = {f.name: f for f in FIXTURES}
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown fixture(s) {unknown}; known: {sorted(known)}")
    torch.set_num_threads(int(os.environ.get("FIXTURE_THREADS", "1")))  # shared 2-core box; also deterministic
    if args.roundtrip:
        return roundtrip(args.out, names)
    metas = [make_fixture(known[n], args.out) for n in names]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; wrote {args.out}")
    print_summary(metas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
