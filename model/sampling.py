"""Sampling strategies: one decode step's logits [B, V] -> the next token [B] and its log-probability [B].

Choices:
- temperature 0 means greedy (argmax). Its reported log-probability is the log-softmax of the RAW logits:
  the greedy "sampling distribution" is a point mass (log-prob 0), which would be useless to GRPO.
- otherwise the sampling distribution is softmax(logits / temperature), restricted to the top_k largest
  logits and then to the nucleus (the smallest prefix of the sorted distribution whose mass reaches top_p,
  measured on the temperature-scaled, top-k-restricted distribution), and renormalised. The reported
  log-probability is that of the sampled token under exactly this distribution.
- randomness only from the explicit key; one key per step, one categorical draw over [B, V].

Cost: greedy is an argmax; top_k is `lax.top_k` (cheap for small k); top_p without top_k sorts the whole
vocabulary every step (262k entries for Gemma 3), so pass top_k as well when speed matters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token from logits. Hashable: it is a static argument of the jitted sampler."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens with total probability >= top_p

    def __post_init__(self):
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def candidate_logits(logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array | None]:
    """The sampling distribution's logits over candidates: (scaled [B, C], ids [B, C] or None = all V).

    Tokens outside top-k / top-p get -inf, so both sampling and the log-softmax ignore them.
    """
    z = logits.astype(jnp.float32) / cfg.temperature
    ids = None
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        z, ids = jax.lax.top_k(z, cfg.top_k)  # [B, k], sorted descending
    if cfg.top_p is not None and cfg.top_p < 1:
        if ids is None:  # nucleus needs the distribution sorted: full-vocabulary sort
            ids = jnp.argsort(-z, axis=-1)  # [B, V]
            z = jnp.take_along_axis(z, ids, axis=-1)
        probs = jax.nn.softmax(z, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        z = jnp.where(mass_before < cfg.top_p, z, -jnp.inf)  # the top token always survives
    return z, ids


def sample_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V]. Returns (tokens int32 [B], log-probs float32 [B])."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)  # raw logits: see the module docstring
        return tokens.astype(jnp.int32), jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    z, ids = candidate_logits(logits, cfg)
    choice = jax.random.categorical(key, z, axis=-1)  # [B] index into the candidates
    logprob = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), choice[:, None], axis=-1)[:, 0]
    tokens = choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprob
