"""Batched KV-cache sampler: one prefill pass, then ONE `lax.while_loop` of single-token decode steps.

Layout (P = prompt bucket, M = max_new_tokens, S = P + M slots):
- Prompts are LEFT-padded into P = max(MIN_BUCKET, next power of two >= the longest prompt), so a run
  compiles the sampler once per bucket it touches, not once per batch.
- A row with n prompt tokens sits in slots P-n .. P-1 at positions 0 .. n-1; its j-th generated token is
  fed back at slot P+j, position n+j. So slot s of row b always has position s - (P - n_b), fixed at
  prefill. The attention mask is built from positions and validity (model.forward.attend), never from slot
  indices, so a row gets exactly the tokens it would get alone, and the sliding window is just
  `0 <= pos_q - pos_k < W` on the same cache (no ring buffer: the cache is sized for the whole run).
- KVCache: k, v [L, B, S, K, H] plus positions / valid [B, S]. Both passes keep k and v in the CARRY of
  the layer scan and write one layer's slice with dynamic_update_slice, which XLA does in place; a scan
  that emitted the cache as its output would copy the whole cache every token.
- prefill (jit): one forward over [B, P] that fills every layer's k/v, unembeds only the last slot (the
  [B, P, V] logits would be GBs for a 262k vocabulary) and samples generated token 0.
- decode (jit, state donated): `lax.while_loop(step < M and not all(done))` over DecodeState; each step
  feeds the previous token, writes its k/v at one slot, attends over all S slots and samples.
- Stopping: a row is done once it emits any of `eos_ids`; afterwards it gets pad tokens (id 0) and
  log-prob 0. `lengths` counts generated tokens including the EOS; `truncated` = no EOS within M.
- Step t uses the key fold_in(key, t): same key -> same samples, whatever the loop's early exit.

Compiles: prefill and decode each compile once per distinct (batch size, prompt bucket, max_new_tokens,
sampling config, model config); the stop ids are a traced vector and do not recompile. TRACE_COUNTS counts traces (diagnostics for tests and BUILD.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import GemmaConfig
from model.forward import attend, attention_inputs, embed_tokens, layer_constants, layer_output, rms_norm, unembed
from model.sampling import SamplingConfig, sample_tokens

MIN_BUCKET = 16  # smallest prompt bucket: short prompts share one compile
MAX_CACHE_LEN = 32_768  # prompt bucket + new tokens: Gemma 3's 32k context (Gemma 2 is trained to 8k)
PAD_ID = 0  # Gemma's <pad>: what a finished row emits
EOS_SLOTS = 4  # stop-id vectors are padded to a multiple of this, so 1 to 4 stop ids share one compile

# Trace counters ("prefill", "decode"): incremented when jit (re)traces, i.e. once per compile.
TRACE_COUNTS: collections.Counter = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for every slot, and where each slot sits in its row."""

    k: jax.Array  # [L, B, S, K, H] post-RoPE keys
    v: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B, S] int32 token position of each slot (negative in left padding)
    valid: jax.Array  # [B, S] bool: slot holds a real token already written


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while_loop carry: fixed-size buffers, so every step has the same shapes."""

    step: jax.Array  # [] int32: tokens sampled so far; the next goes to column `step`
    last_token: jax.Array  # [B] int32: token sampled at step-1, fed to the model next
    tokens: jax.Array  # [B, M] int32 generated tokens; PAD_ID after a row's stop and past `step`
    logprobs: jax.Array  # [B, M] float32 log-prob of each token under the sampling distribution; 0 on padding
    done: jax.Array  # [B] bool: the row has emitted an EOS id
    lengths: jax.Array  # [B] int32 generated tokens per row, EOS included
    key: jax.Array  # PRNG key; step t samples with fold_in(key, t)
    cache: KVCache


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What `generate` returns (numpy, on the host)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32, PAD_ID after the stop
    lengths: np.ndarray  # [B] int32 generated tokens, the EOS included when one was emitted
    logprobs: np.ndarray  # [B, max_new_tokens] float32, 0 after the stop
    truncated: np.ndarray  # [B] bool: no EOS within max_new_tokens


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], cfg: GemmaConfig, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and LEFT-pad prompts into [B, P]. Returns (tokens int32 [B, P], pad int32 [B] = padding per row)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(prompts, str | bytes) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    rows = [np.asarray(p) for p in prompts]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {i} must be a non-empty list of ints, got shape {row.shape} dtype {row.dtype}")
        if row.min() < 0 or row.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): min {row.min()}, max {row.max()}")
    longest = max(r.size for r in rows)
    bucket = prompt_bucket(longest)
    if bucket + max_new_tokens > MAX_CACHE_LEN:
        raise ValueError(f"longest prompt has {longest} tokens (bucket {bucket}); bucket + max_new_tokens "
                         f"{max_new_tokens} must be <= {MAX_CACHE_LEN}")
    tokens = np.full((len(rows), bucket), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        tokens[i, bucket - row.size:] = row
    pad = np.array([bucket - r.size for r in rows], np.int32)
    return tokens, pad


def eos_vector(eos_ids: Sequence[int]) -> np.ndarray:
    """Stop ids as a traced int32 vector, padded with -1 (never sampled) to a multiple of EOS_SLOTS.

    A traced vector, not a static tuple, so changing the stop tokens does not recompile the sampler.
    """
    ids = sorted({int(e) for e in eos_ids})
    if any(e < 0 for e in ids):
        raise ValueError(f"eos_ids must be non-negative token ids, got {list(eos_ids)}")
    size = EOS_SLOTS * max(1, -(-len(ids) // EOS_SLOTS))
    return np.array(ids + [-1] * (size - len(ids)), np.int32)


def _record(state: DecodeState, token: jax.Array, logprob: jax.Array, eos_ids: jax.Array) -> DecodeState:
    """Store the step's sample; rows already done get padding and log-prob 0."""
    live = ~state.done
    token = jnp.where(live, token, PAD_ID)
    logprob = jnp.where(live, logprob, 0.0)
    col = (0, state.step)
    hit_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)  # [B]
    return dataclasses.replace(
        state,
        step=state.step + 1,
        last_token=token,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], col),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], col),
        done=state.done | (live & hit_eos),
        lengths=state.lengths + live.astype(jnp.int32),
    )


def _last_logits(params: dict, x: jax.Array, cfg: GemmaConfig) -> jax.Array:
    """Float32 logits [B, V] of the last slot only."""
    return unembed(params, rms_norm(x[:, -1], params["final_norm"], cfg.rms_eps), cfg)


def _layer_xs(params: dict, cfg: GemmaConfig):
    return params["layers"], layer_constants(cfg), jnp.arange(cfg.num_layers)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens"))
def prefill(params: dict, tokens: jax.Array, pad: jax.Array, eos_ids: jax.Array, key: jax.Array, *,
            cfg: GemmaConfig, sampling: SamplingConfig, max_new_tokens: int) -> DecodeState:
    """Run the left-padded prompts [B, P] through the model, fill the cache, sample generated token 0."""
    TRACE_COUNTS["prefill"] += 1
    with jax.named_scope("prefill"):
        b, p = tokens.shape
        s = p + max_new_tokens
        slots = jnp.arange(s, dtype=jnp.int32)
        positions = slots[None, :] - pad[:, None]  # [B, S]: slot s of row b holds position s - pad_b
        valid = (positions >= 0) & (slots[None, :] < p)  # [B, S]: the real prompt tokens
        x = embed_tokens(params, tokens, cfg)  # [B, P, D]
        shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)  # [L, B, S, K, H]
        q_pos, q_valid = positions[:, :p], valid[:, :p]

        def body(carry, layer):
            x, ck, cv = carry
            lp, c, i = layer
            q, k, v = attention_inputs(lp, x, c, q_pos, cfg)
            attn = attend(q, k, v, q_pos, q_pos, q_valid, c["window"], cfg)  # the prompt attends to itself only
            ck = jax.lax.dynamic_update_slice(ck, k[None], (i, 0, 0, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v[None], (i, 0, 0, 0, 0))
            return (layer_output(lp, x, attn, cfg), ck, cv), None

        init = (x, jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
        (x, ck, cv), _ = jax.lax.scan(body, init, _layer_xs(params, cfg))
        token, logprob = sample_tokens(_last_logits(params, x, cfg), jax.random.fold_in(key, 0), sampling)
        state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            last_token=jnp.zeros((b,), jnp.int32),
            tokens=jnp.full((b, max_new_tokens), PAD_ID, jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            done=jnp.zeros((b,), bool),
            lengths=jnp.zeros((b,), jnp.int32),
            key=key,
            cache=KVCache(ck, cv, positions, valid),
        )
        return _record(state, token, logprob, eos_ids)


def _decode_step(params: dict, state: DecodeState, eos_ids: jax.Array, cfg: GemmaConfig,
                 sampling: SamplingConfig) -> DecodeState:
    """Feed last_token at its slot, write its k/v into every layer's cache, sample the next token."""
    cache = state.cache
    b, m = state.tokens.shape
    slot = cache.k.shape[2] - m + state.step - 1  # P + (step - 1): where the previous token goes
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, slot))
    q_pos = jax.lax.dynamic_slice(cache.positions, (0, slot), (b, 1))  # [B, 1]
    x = embed_tokens(params, state.last_token[:, None], cfg)  # [B, 1, D]

    def body(carry, layer):
        x, ck, cv = carry
        lp, c, i = layer
        q, k, v = attention_inputs(lp, x, c, q_pos, cfg)
        ck = jax.lax.dynamic_update_slice(ck, k[None], (i, 0, slot, 0, 0))  # in place: ck is carried
        cv = jax.lax.dynamic_update_slice(cv, v[None], (i, 0, slot, 0, 0))
        attn = attend(q, ck[i], cv[i], q_pos, cache.positions, valid, c["window"], cfg)
        return (layer_output(lp, x, attn, cfg), ck, cv), None

    (x, ck, cv), _ = jax.lax.scan(body, (x, cache.k, cache.v), _layer_xs(params, cfg))
    key = jax.random.fold_in(state.key, state.step)
    token, logprob = sample_tokens(_last_logits(params, x, cfg), key, sampling)
    state = dataclasses.replace(state, cache=KVCache(ck, cv, cache.positions, valid))
    return _record(state, token, logprob, eos_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("state",))
def decode(params: dict, state: DecodeState, eos_ids: jax.Array, *, cfg: GemmaConfig,
           sampling: SamplingConfig) -> DecodeState:
    """Sample until every row is done or the token budget is spent: one while_loop, no host round trips."""
    TRACE_COUNTS["decode"] += 1
    with jax.named_scope("decode"):
        budget = state.tokens.shape[1]
        return jax.lax.while_loop(
            lambda st: (st.step < budget) & ~jnp.all(st.done),
            lambda st: _decode_step(params, st, eos_ids, cfg, sampling),
            state,
        )


def generate(
    params: dict,
    cfg: GemmaConfig,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] = (1,),
) -> SampleResult:
    """Sample up to max_new_tokens for each prompt (a list of token-id lists; temperature 0 = greedy).

    eos_ids: any of these ends a row (Gemma: 1 and <end_of_turn>); pass () to always run the full budget.
    """
    sampling = SamplingConfig(temperature, top_k, top_p)
    tokens, pad = pad_prompts(prompts, cfg, max_new_tokens)
    eos = eos_vector(eos_ids)
    state = prefill(params, tokens, pad, eos, key, cfg=cfg, sampling=sampling, max_new_tokens=max_new_tokens)
    state = decode(params, state, eos, cfg=cfg, sampling=sampling)
    return SampleResult(
        tokens=np.asarray(state.tokens),
        lengths=np.asarray(state.lengths),
        logprobs=np.asarray(state.logprobs),
        truncated=~np.asarray(state.done),
    )
