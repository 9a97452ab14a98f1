"""Sampling strategies: one decode step's logits [B, V] -> the next token [B] and its log-probability [B].

Choices:
- temperature 0 means greedy (argmax, first index on ties). Its reported log-probability is the log-softmax of
  the RAW logits: the greedy "sampling distribution" is a point mass (log-prob 0), useless to GRPO.
- otherwise the sampling distribution is softmax(logits / temperature), restricted to the top_k largest
  logits, then to the nucleus, and renormalised. The nucleus keeps token i iff the total probability of the
  tokens STRICTLY more likely than i is < top_p (so the most likely token always stays, and tied tokens
  stay or go together); it is measured on the temperature-scaled, top-k-restricted distribution. The
  reported log-probability is that of the sampled token under exactly this distribution.
- randomness only from the explicit key; row r of a batch draws from fold_in(key, r), so a row's sample does
  not depend on how many rows share the batch.

Speed (Gemma 3: V = 262144, on CPU): `jax.random.categorical` draws V Gumbel variates per row (threefry:
BUILD.md "Sampler" has the cost) and a full-vocabulary sort is slower still, so neither is used. Tokens are drawn
by a two-level inverse CDF (block masses, then one block; two uniforms per row) and the nucleus is found
by bisecting the probability threshold (30 masked sums, no sort).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CDF_BLOCK = 512  # inverse-CDF block size: cumsums of at most V / 512 and 512 entries instead of V
_ONE_BITS = 0x3F800000  # int32 bit pattern of float32 1.0; non-negative floats sort like their bit patterns
# The smallest temperature above 0 (greedy): below ~1e-36 logits / T overflow float32 into NaN log-probs, and
# long before that the distribution is the argmax's.
MIN_TEMPERATURE = 1e-4


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token from logits. Hashable: it is a static argument of the jitted sampler."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: see the module docstring

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or (t < MIN_TEMPERATURE
                                                                                            and t != 0):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def nucleus_threshold(probs: jax.Array, top_p: float) -> jax.Array:
    """Per row, the smallest float t with mass(p > t) < top_p; the nucleus is {p >= t}. probs [B, C] -> [B].

    Bisection over the int32 bit patterns of floats in [0, 1]: exact after 30 halvings, with no sort.
    Invariant: mass above `hi` < top_p <= mass above `lo`.
    """

    def mass_above(bits):  # [B]
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1)

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        small = mass_above(mid) < top_p
        return jnp.where(small, lo, mid), jnp.where(small, mid, hi)

    b = probs.shape[0]
    lo = jnp.zeros((b,), jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)  # nothing lies above the max
    _, hi = jax.lax.fori_loop(0, _ONE_BITS.bit_length(), halve, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def candidate_logits(logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array | None]:
    """The sampling distribution's logits over candidates: (scaled [B, C], ids [B, C] or None = all V).

    Tokens outside top-k / top-p get -inf, so sampling and the log-softmax both ignore them.
    """
    z = logits.astype(jnp.float32) / cfg.temperature
    ids = None
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        z, ids = jax.lax.top_k(z, cfg.top_k)  # [B, k]
    if cfg.top_p is not None and cfg.top_p < 1:
        probs = jax.nn.softmax(z, axis=-1)
        z = jnp.where(probs >= nucleus_threshold(probs, cfg.top_p)[:, None], z, -jnp.inf)
    return z, ids


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """[B, C] -> [B, C / CDF_BLOCK, CDF_BLOCK], padded with `fill`."""
    b, c = x.shape
    blocks = -(-c // CDF_BLOCK)
    return jnp.pad(x, ((0, 0), (0, blocks * CDF_BLOCK - c)), constant_values=fill).reshape(b, blocks, CDF_BLOCK)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, C], index [B]."""
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the max) of [B, V], via per-block maxima: XLA:CPU's
    argmax is a variadic (value, index) reduce, slow over 262k entries (BUILD.md "Sampler")."""
    blocks = _blocks(logits, -jnp.inf)  # [B, blocks, block]
    first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # the first block holding the max
    inner = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]  # [B, block]
    return first * CDF_BLOCK + jnp.argmax(inner, axis=-1)


def _log_normaliser(z: jax.Array) -> jax.Array:
    """logsumexp over the last axis of [B, C] (-inf entries allowed, at least one finite): [B]."""
    m = jnp.max(z, axis=-1)
    return m + jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=-1))


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index i with cum[i-1] <= u * total < cum[i], for weights [B, n] >= 0 (some > 0) and u [B] in [0, 1)."""
    n = weights.shape[-1]
    cum = jnp.cumsum(weights, axis=-1)
    index = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)  # zero-weight entries can never be chosen
    last = n - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)  # guards u * total rounding up to total
    return jnp.minimum(index, last)


def categorical(key: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample one index per row from softmax(z), z [B, C] (-inf allowed), by a two-level inverse CDF.

    Returns (index [B], its log-probability [B]).
    """
    b = z.shape[0]
    m = jnp.max(z, axis=-1)
    w = _blocks(jnp.exp(z - m[:, None]), 0.0)  # [B, blocks, block] unnormalised probabilities
    mass = jnp.sum(w, axis=-1)  # [B, blocks]
    # Row r's two uniforms come from fold_in(key, r): a row's draw does not depend on the batch size.
    u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (2,)))(jnp.arange(b))  # [B, 2]
    block = _inverse_cdf(mass, u[:, 0])  # P(block) = block mass / total
    inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]  # [B, block]
    index = block * CDF_BLOCK + _inverse_cdf(inner, u[:, 1])  # P(i | block) = w_i / block mass
    return index, _take(z, index) - m - jnp.log(jnp.sum(mass, axis=-1))


def sample_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V]. Returns (tokens int32 [B], log-probs float32 [B])."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tokens = argmax(logits)
        return tokens.astype(jnp.int32), _take(logits, tokens) - _log_normaliser(logits)  # raw: see the docstring
    z, ids = candidate_logits(logits, cfg)
    choice, logprob = categorical(key, z)  # index into the candidates
    tokens = choice if ids is None else _take(ids, choice)
    return tokens.astype(jnp.int32), logprob
