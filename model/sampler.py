"""Batched KV-cache sampler: one prefill pass, then a `lax.while_loop` over blocks of single-token decode steps.

Layout (P = prompt bucket, M = max_new_tokens, S = P + M slots; budget forcing adds its extra steps' slots):
- Prompts are LEFT-padded into a bucket of P slots (`prompt_bucket`: quarter-octave steps, min 16), so a run
  compiles the sampler once per bucket it touches, not once per batch.
- A row with n prompt tokens sits in slots P-n .. P-1 at positions 0 .. n-1; its j-th generated token is
  fed back at slot P+j, position n+j. So slot s of row b always has position s - (P - n_b), fixed at
  prefill (without budget forcing: a rewound row writes each slot's position as it feeds it). The attention
  mask is built from positions and validity (model.forward.attend), never from slot indices, so a row gets
  exactly the tokens it would get alone, and the sliding window is just `0 <= pos_q - pos_k < W` on the same
  cache (no ring buffer: the cache is sized for the whole run).
- KVCache: per layer k, v [B, K, S, H], plus positions / valid [B, S], in the while_loop carry (state
  donated). Each token's k/v is written with dynamic_update_slice, in place.
- prefill (jit): a forward over [B, P] (model.forward.scan_layers, PREFILL_ROWS rows at a time) that fills
  the cache, unembeds only the last slot (the [B, P, V] logits would be GBs for a 262k vocabulary) and samples
  generated token 0.
- decode (jit): blocks of CHECK_EVERY steps (a fixed trip count) inside `lax.while_loop(step < M (+ budget
  forcing's extra steps) and not all(done))` over DecodeState, so the host is asked once per block (see
  `decode`). Each step feeds the previous token, attends over the cache as it was plus the token's own k/v
  (model/decode_attention.py), then writes that k/v at its slot, and samples.
- Stopping (StopRule): a row is done once it emits any of `eos_ids` (default: cfg.eos_id) or once its decoded
  text contains a stop string (an automaton over whole tokens, model/stop_text.py; the training loop's
  `</answer>`); afterwards it gets cfg.pad_id and log-prob 0. `lengths` counts generated tokens including the
  stopping one; `truncated` = no stop within M. The loop ends at the first block boundary after every row is done
  (with budget forcing, or its output is full).
- Step t uses the key fold_in(key, t): same key -> same samples, whatever the loop's early exit.
- Budget forcing (s1, model/think_budget.py; off unless `generate(think=...)`): rows get their own output columns
  and can rewind; the cache slots still advance with the shared step.

Decode speed on CPU (bin/bench_sample; BUILD.md "Sampler" has the numbers): at batch 1 a step is bound
by reading the weights; at larger batches by the tied-unembedding GEMM. Five XLA:CPU traps, each a sizeable
share of a step (BUILD.md), are avoided: (1) slicing layer l out of stacked
[L, ...] weights or cache inside the loop (XLA copies the slice every token): per-layer cache buffers, a
Python loop over layers, weights sliced once before the loop (`_unstack_layers`); (2) copy insertion
duplicating every cache buffer twice per token when the body reads and updates it: the cache is read before
it is written, and decode compiles with XLA's region analysis (`DECODE_COMPILER_OPTIONS`); (3) einsums that
transpose the cache (decode_attend's order) or the output projection (o viewed as one head of width N*H);
(4) Gumbel sampling and sorting over 262k logits (model/sampling.py); (5) XLA's variadic argmax reduce (a
two-level argmax in model/sampling.py).

Compiles: prefill and decode each compile once per distinct (batch size, prompt bucket, max_new_tokens,
sampling config, model config, and with budget forcing its extra steps and forced sequences' token lengths);
the stop ids are a traced vector and do not recompile. TRACE_COUNTS
counts traces (diagnostics for tests and BUILD.md).
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
from model.decode_attention import decode_attend
from model.forward import (
    attention_inputs,
    embed_tokens,
    layer_constants,
    layer_output,
    rms_norm,
    scan_layers,
    unembed,
)
from model.sampling import SamplingConfig, sample_tokens
from model.stop_text import no_stop_table
from model.think_budget import ForcingRule, ThinkForcing, ThinkState, forced_record, initial_state

MIN_BUCKET = 16  # smallest prompt bucket: short prompts share one compile
BUCKETS_PER_OCTAVE = 4  # prompt buckets between consecutive powers of two (see prompt_bucket)
MAX_CACHE_LEN = 32_768  # prompt bucket + new tokens: Gemma 3's 32k context (Gemma 2 is trained to 8k)
PREFILL_ROWS = 8  # prefill runs the prompts in groups of this many rows (see prefill's docstring)
EOS_SLOTS = 4  # stop-id vectors are padded to a multiple of this, so 1 to 4 stop ids share one compile
CHECK_EVERY = 8  # decode steps between checks that every row is done (decode's docstring; BUILD.md measures it)

# Trace counters ("prefill", "decode"): incremented when jit (re)traces, i.e. once per compile.
TRACE_COUNTS: collections.Counter = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for every slot, and where each slot sits in its row.

    One buffer per layer, not one stacked [L, ...] array: on CPU, slicing a layer out of a stacked cache
    inside the decode loop materialises a copy of it every token (BUILD.md: attention several times slower).
    """

    k: tuple[jax.Array, ...]  # L x [B, K, S, H] post-RoPE keys; [B, K] leading so attention dots need no transpose
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    positions: jax.Array  # [B, S] int32 token position of each slot (negative in left padding)
    valid: jax.Array  # [B, S] bool: slot holds a real token already written


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while_loop carry: fixed-size buffers, so every step has the same shapes."""

    step: jax.Array  # [] int32: tokens sampled so far; the next goes to column `step` (budget forcing: `think.cols`)
    last_token: jax.Array  # [B] int32: token sampled at step-1, fed to the model next
    tokens: jax.Array  # [B, M] int32 generated tokens; cfg.pad_id after a row's stop and past `step`
    logprobs: jax.Array  # [B, M] float32 log-prob of each token under the sampling distribution; 0 on padding
    done: jax.Array  # [B] bool: the row has stopped (an EOS id, or its text reached the stop string)
    lengths: jax.Array  # [B] int32 generated tokens per row, the stopping token included
    text_state: jax.Array  # [B] int32 stop-string automaton state (model/stop_text.py)
    key: jax.Array  # PRNG key; step t samples with fold_in(key, t)
    cache: KVCache
    think: ThinkState | None = None  # budget forcing's per-row columns and state (model/think_budget.py); None: off


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a row stops: on any EOS id, or once its decoded text contains a stop string. Traced arrays, so other
    stop ids or another stop string do not recompile (only a table of another height does)."""

    eos_ids: jax.Array  # [E] int32, padded with -1 (eos_vector)
    text_table: jax.Array  # [S, V] int8 automaton (model/stop_text.py); state S = matched; [1, V] zeros: none


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What `generate` returns (numpy, on the host)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32, cfg.pad_id after the stop
    lengths: np.ndarray  # [B] int32 generated tokens, the stopping one (EOS or stop string's last) included
    logprobs: np.ndarray  # [B, max_new_tokens] float32, 0 after the stop
    truncated: np.ndarray  # [B] bool: no stop (EOS or stop string) within max_new_tokens
    forced: np.ndarray | None = None  # [B, max_new_tokens] bool: tokens budget forcing put there; None: no forcing


def prompt_bucket(length: int) -> int:
    """Padded prompt length: MIN_BUCKET, or the next multiple of 1/BUCKETS_PER_OCTAVE of the octave above.

    Quarter-octave steps (16, 20, 24, 28, 32, 40, ..., 128, 160, 192, 224, 256, ...) waste at most 25% of the
    prompt compute on padding (a power of two wastes up to 100%: 150 tokens -> 256 slots) for at most four
    compiles per doubling of the prompt length.
    """
    if length <= MIN_BUCKET:
        return MIN_BUCKET
    octave = 1 << (length - 1).bit_length()  # the next power of two >= length
    step = octave // (2 * BUCKETS_PER_OCTAVE)  # (octave / 2, octave] split into BUCKETS_PER_OCTAVE buckets
    return -(-length // step) * step


def check_fits(prompt_len: int, new_tokens: int, flag: str = "max_new_tokens") -> None:
    """A ValueError naming --flag unless a prompt of prompt_len tokens (padded to its bucket) plus new_tokens
    fits the cache: pad_prompts' rule, which a tool checks before any weight loads."""
    bucket = prompt_bucket(prompt_len)
    if bucket + new_tokens > MAX_CACHE_LEN:
        raise ValueError(f"--{flag}: {new_tokens} new tokens after a {prompt_len}-token prompt (bucket {bucket}) "
                         f"exceed the {MAX_CACHE_LEN}-token context")


def pad_prompts(
    prompts: Sequence[Sequence[int]], cfg: GemmaConfig, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
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
            raise ValueError(
                f"prompt {i} has token ids outside [0, {cfg.vocab_size}): min {row.min()}, max {row.max()}"
            )
    longest = max(r.size for r in rows)
    check_fits(longest, max_new_tokens)
    bucket = prompt_bucket(longest)
    tokens = np.full((len(rows), bucket), cfg.pad_id, np.int32)
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


def stop_rule(cfg: GemmaConfig, eos_ids: Sequence[int], text_table: np.ndarray | None = None) -> StopRule:
    """The StopRule for these EOS ids and an optional stop-string table ([S, V'] int8, V' <= vocab: ids past the
    tokenizer's pieces add no text, as in Tokenizer.decode, so they leave the match state as it is)."""
    table = no_stop_table(cfg.vocab_size) if text_table is None else np.asarray(text_table, np.int8)
    if table.ndim != 2 or table.shape[1] > cfg.vocab_size:
        raise ValueError(f"text_table must be [S, <= {cfg.vocab_size}], got shape {table.shape}")
    states = np.arange(table.shape[0], dtype=np.int8)[:, None]
    table = np.concatenate([table, np.broadcast_to(states, (table.shape[0], cfg.vocab_size - table.shape[1]))], 1)
    return StopRule(jnp.asarray(eos_vector(eos_ids)), jnp.asarray(table))


def _record(state: DecodeState, token: jax.Array, logprob: jax.Array, stops: StopRule,
            pad_id: int) -> DecodeState:
    """Store the step's sample; rows already done get pad_id and log-prob 0. A row stops on an EOS id or when
    the token completes the stop string. A step at or past the budget (the tail of decode's last block of
    steps) records nothing but `step`: its column index is clamped, so it writes back what is there (the
    decode step may still write k/v into the cache's last slot, which no recorded step reads)."""
    budget = state.tokens.shape[1]
    active = state.step < budget  # []
    live = ~state.done & active
    token = jnp.where(live, token, pad_id)
    logprob = jnp.where(live, logprob, 0.0)
    col = (0, jnp.minimum(state.step, budget - 1))

    def write(buf, value):  # [B, M] <- [B] at column `step`; past the budget, the column's own value
        old = jax.lax.dynamic_slice(buf, col, (buf.shape[0], 1))[:, 0]
        return jax.lax.dynamic_update_slice(buf, jnp.where(active, value, old)[:, None], col)

    hit_eos = jnp.any(token[:, None] == stops.eos_ids[None, :], axis=-1)  # [B]
    text_state = jnp.where(live, stops.text_table[state.text_state, token].astype(jnp.int32), state.text_state)
    hit_text = text_state >= stops.text_table.shape[0]  # [B]
    return dataclasses.replace(
        state,
        step=state.step + 1,
        last_token=token,
        tokens=write(state.tokens, token),
        logprobs=write(state.logprobs, logprob),
        done=state.done | (live & (hit_eos | hit_text)),
        lengths=state.lengths + live.astype(jnp.int32),
        text_state=text_state,
    )


def _emit(state: DecodeState, token: jax.Array, logprob: jax.Array, stops: StopRule, rule: ForcingRule | None,
          pad_id: int, steps: int) -> DecodeState:
    """_record, or its budget-forcing version when there is a rule."""
    if rule is None:
        return _record(state, token, logprob, stops, pad_id)
    return forced_record(state, token, logprob, stops, rule, pad_id, steps)


def _last_logits(params: dict, x: jax.Array, cfg: GemmaConfig) -> jax.Array:
    """Float32 logits [B, V] of hidden states [B, D]."""
    return unembed(params, rms_norm(x, params["final_norm"], cfg.rms_eps), cfg)


def _prefill_rows(batch: int) -> int:
    """Rows per prefill pass: the largest divisor of batch <= PREFILL_ROWS, or the whole batch if that is small."""
    rows = max(d for d in range(1, PREFILL_ROWS + 1) if batch % d == 0)
    return rows if rows > PREFILL_ROWS // 2 else batch


def _prompt_stack(params: dict, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cfg: GemmaConfig):
    """The layer stack over prompts [b, P]: (last slot's hidden state [b, D], keys, values [L, b, P, K, H])."""
    x = embed_tokens(params, tokens, cfg)  # [b, P, D]; the prompt attends only to itself, so no cache is read
    x, (ks, vs) = scan_layers(params["layers"], x, positions, valid, cfg, collect_kv=True)
    return x[:, -1], ks, vs


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens", "repeats", "extra_steps"))
def prefill(params: dict, tokens: jax.Array, pad: jax.Array, stops: StopRule, key: jax.Array,
            rule: ForcingRule | None = None, *, cfg: GemmaConfig, sampling: SamplingConfig, max_new_tokens: int,
            repeats: int = 1, extra_steps: int = 0) -> DecodeState:
    """Run the left-padded prompts [U, P] through the model, fill the cache, sample generated token 0.

    repeats: each prompt becomes `repeats` consecutive rows (B = U * repeats; row r continues prompt r //
    repeats). The prompt is run ONCE and its hidden state and cache rows are replicated: exact (the rows would
    compute the same values) and (repeats - 1) / repeats of the prefill saved. GRPO's G completions per prompt
    use it. Token 0 is sampled per row, after the replication.

    Rows go through the layer stack PREFILL_ROWS at a time (lax.map): one [32 * P, F] pass ran slower than
    four [8 * P, F] passes on CPU (BUILD.md), and the activations stay bounded for batches with a divisor in
    (PREFILL_ROWS / 2, PREFILL_ROWS]; others run in one pass (`_prefill_rows`).

    rule: budget forcing (model/think_budget.py), whose rewinds take up to extra_steps more steps and slots.
    """
    TRACE_COUNTS["prefill"] += 1
    with jax.named_scope("prefill"):
        b, p = tokens.shape  # b = U here; B after the replication below
        steps = max_new_tokens + extra_steps
        slots = jnp.arange(p + steps, dtype=jnp.int32)
        positions = slots[None, :] - pad[:, None]  # [B, S]: slot s of row b holds position s - pad_b
        valid = (positions >= 0) & (slots[None, :] < p)  # [B, S]: the real prompt tokens

        prompts, rows = (tokens, positions[:, :p], valid[:, :p]), _prefill_rows(b)
        if rows == b:
            x, ks, vs = _prompt_stack(params, *prompts, cfg)  # x [B, D]; ks, vs [L, B, P, K, H]
        else:
            chunks = tuple(a.reshape(b // rows, rows, p) for a in prompts)  # [B / rows, rows, P]
            x, ks, vs = jax.lax.map(lambda chunk: _prompt_stack(params, *chunk, cfg), chunks)
            x = x.reshape(b, -1)
            ks, vs = (a.swapaxes(0, 1).reshape(cfg.num_layers, b, *a.shape[3:]) for a in (ks, vs))
        if repeats > 1:  # [U, ...] -> [U * repeats, ...], prompt-major: the G rows of a prompt are adjacent
            b *= repeats
            x = jnp.repeat(x, repeats, axis=0)
            ks, vs = (jnp.repeat(a, repeats, axis=1) for a in (ks, vs))
            positions, valid = (jnp.repeat(a, repeats, axis=0) for a in (positions, valid))

        def to_cache(a):  # [B, P, K, H] -> [B, K, S, H], the new-token slots zero
            return jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, steps), (0, 0)))

        cache = KVCache(tuple(to_cache(k) for k in ks), tuple(to_cache(v) for v in vs), positions, valid)
        token, logprob = sample_tokens(_last_logits(params, x, cfg), jax.random.fold_in(key, 0), sampling)
        state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            last_token=jnp.zeros((b,), jnp.int32),
            tokens=jnp.full((b, max_new_tokens), cfg.pad_id, jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            done=jnp.zeros((b,), bool),
            lengths=jnp.zeros((b,), jnp.int32),
            text_state=jnp.zeros((b,), jnp.int32),
            key=key,
            cache=cache,
            think=None if rule is None else initial_state(positions[:, p - 1] + 1, max_new_tokens),
        )
        return _emit(state, token, logprob, stops, rule, cfg.pad_id, steps)


def _unstack_layers(params: dict, cfg: GemmaConfig) -> tuple[dict, ...]:
    """Per-layer weight dicts for decode, sliced from the stacked [L, ...] weights once, before the loop.

    The decode step is a Python loop over layers rather than a scan: a scan slices every layer's weights out
    of the stacked arrays each token, which XLA on CPU materialises as a copy (BUILD.md "Sampler").
    The output projection is viewed as ONE head of width N*H ([1, N*H, D]): with o [N, H, D], XLA's CPU dot
    transposes o (and the attention output) every token for the two contracting dims.
    """
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.embed_dim

    def layer(i):
        lp = jax.tree.map(lambda a: a[i], params["layers"])
        return {**lp, "o": lp["o"].reshape(1, n * h, d)}

    return tuple(layer(i) for i in range(cfg.num_layers))


def _decode_step(params: dict, layers: tuple[dict, ...], state: DecodeState, stops: StopRule,
                 rule: ForcingRule | None, steps: int, cfg: GemmaConfig, sampling: SamplingConfig) -> DecodeState:
    """Feed last_token at its slot, write its k/v into every layer's cache, sample the next token."""
    cache = state.cache
    b = state.tokens.shape[0]
    slot = cache.positions.shape[1] - steps + state.step - 1  # P + (step - 1): where the previous token goes
    q_pos = jax.lax.dynamic_slice(cache.positions, (0, slot), (b, 1))  # [B, 1]
    x = embed_tokens(params, state.last_token[:, None], cfg)  # [B, 1, D]
    consts = layer_constants(cfg)
    new_k, new_v = [], []
    for i, (lp, ck, cv) in enumerate(zip(layers, cache.k, cache.v, strict=True)):
        c = {name: value[i] for name, value in consts.items()}
        q, k, v = attention_inputs(lp, x, c, q_pos, cfg)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, 1, H]
        attn = decode_attend(q, ck, cv, k, v, q_pos, cache.positions, cache.valid, c["window"], cfg)
        x = layer_output(lp, x, attn.reshape(b, 1, 1, -1), cfg)  # one head of width N*H: see _unstack_layers
        new_k.append(jax.lax.dynamic_update_slice(ck, k, (0, 0, slot, 0)))  # in place: the cache is carried
        new_v.append(jax.lax.dynamic_update_slice(cv, v, (0, 0, slot, 0)))
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, slot))
    token, logprob = sample_tokens(_last_logits(params, x[:, 0], cfg), jax.random.fold_in(state.key, state.step),
                                   sampling)
    state = dataclasses.replace(state, cache=KVCache(tuple(new_k), tuple(new_v), cache.positions, valid))
    return _emit(state, token, logprob, stops, rule, cfg.pad_id, steps)


# XLA:CPU's default copy insertion copies every layer's cache buffer twice per token when the loop body both
# reads it (attention) and updates it in place; its region analysis proves the copies unnecessary (BUILD.md
# counts them). A no-op on other backends.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "check_every", "extra_steps"),
                   donate_argnames=("state",), compiler_options=DECODE_COMPILER_OPTIONS)
def decode(params: dict, state: DecodeState, stops: StopRule, rule: ForcingRule | None = None, *, cfg: GemmaConfig,
           sampling: SamplingConfig, check_every: int = CHECK_EVERY, extra_steps: int = 0) -> DecodeState:
    """Sample until every row is done or the token budget is spent: no host round trips.

    Two nested loops: blocks of `check_every` steps (a fixed trip count, so a GPU runs them without asking the
    host anything), and around them a while_loop that stops once every row is done or the budget is spent. A
    while_loop whose predicate depends on data copies that predicate to the host after each trip on GPU; here
    it happens once per block. The price: up to check_every - 1 steps computed after the last row stopped
    (or past the budget), whose writes `_record` turns into no-ops, so the tokens are the same as stepping
    one token at a time. With budget forcing (rule; prefill's extra_steps again), a row is also finished once its
    output is full.
    """
    TRACE_COUNTS["decode"] += 1
    with jax.named_scope("decode"):
        m = state.tokens.shape[1]
        budget = m + extra_steps
        every = max(1, min(check_every, budget))
        layers = _unstack_layers(params, cfg)  # outside the loop: sliced once per call

        def block(st):
            return jax.lax.fori_loop(
                0, every, lambda _, s: _decode_step(params, layers, s, stops, rule, budget, cfg, sampling), st)

        def running(st):
            finished = st.done if rule is None else st.done | (st.think.cols >= m)
            return (st.step < budget) & ~jnp.all(finished)

        return jax.lax.while_loop(running, block, state)


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
    eos_ids: Sequence[int] | None = None,
    stop_table: np.ndarray | None = None,
    num_repeats: int = 1,
    think: ThinkForcing | None = None,
) -> SampleResult:
    """Sample up to max_new_tokens for each prompt (a list of token-id lists; temperature 0 = greedy).

    num_repeats: draw that many completions per prompt (rows prompt-major: row r answers prompt r //
    num_repeats) from ONE prefill of each prompt, its cache rows replicated (`prefill`'s `repeats`).

    eos_ids: any of these ends a row; None: (cfg.eos_id,). Chat models also stop on <end_of_turn>
    (model/tokenizer.py `stop_ids`). Pass () to always run the full budget. stop_table: a row also ends once its
    text contains a stop string (model/stop_text.py builds the table, e.g. for "</answer>"). think: s1 budget
    forcing (model/think_budget.py `think_forcing`); the result's `forced` marks the tokens it put there.
    """
    sampling = SamplingConfig(temperature, top_k, top_p)
    tokens, pad = pad_prompts(prompts, cfg, max_new_tokens)
    stops = stop_rule(cfg, (cfg.eos_id,) if eos_ids is None else eos_ids, stop_table)
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive integer, got {num_repeats!r}")
    rule, extra = (None, 0) if think is None else (jax.tree.map(jnp.asarray, think.rule), think.extra_steps)
    state = prefill(params, tokens, pad, stops, key, rule, cfg=cfg, sampling=sampling, max_new_tokens=max_new_tokens,
                    repeats=num_repeats, extra_steps=extra)
    state = decode(params, state, stops, rule, cfg=cfg, sampling=sampling, extra_steps=extra)
    return SampleResult(
        tokens=np.asarray(state.tokens),
        lengths=np.asarray(state.lengths),
        logprobs=np.asarray(state.logprobs),
        truncated=~np.asarray(state.done),
        forced=None if think is None else np.asarray(state.think.forced),
    )


def generate_in_chunks(params: dict, cfg: GemmaConfig, prompts: Sequence[Sequence[int]], key: jax.Array,
                       chunk: int, *, max_new_tokens: int, sampling: SamplingConfig,
                       eos_ids: Sequence[int] | None = None, stop_table: np.ndarray | None = None,
                       num_repeats: int = 1, think: ThinkForcing | None = None) -> SampleResult:
    """`generate` over the prompts `chunk` at a time (bounding one call's KV cache), results concatenated in
    order. Chunk i samples with fold_in(key, i), or with key itself when one chunk holds every prompt, so a run
    that fits in one call draws what `generate` would. The last chunk may be smaller (one more compile)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    parts = []
    for i, start in enumerate(range(0, len(prompts), chunk)):
        part_key = key if chunk >= len(prompts) else jax.random.fold_in(key, i)
        parts.append(generate(params, cfg, prompts[start : start + chunk], part_key, max_new_tokens=max_new_tokens,
                              temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                              eos_ids=eos_ids, stop_table=stop_table, num_repeats=num_repeats, think=think))
    if len(parts) == 1:
        return parts[0]
    joined = {f.name: [getattr(r, f.name) for r in parts] for f in dataclasses.fields(SampleResult)}
    return SampleResult(**{name: None if v[0] is None else np.concatenate(v) for name, v in joined.items()})
