"""Attention for ONE new token over the sampler's KV cache (model/sampler.py's decode step).

The cache [B, K, S, H] is read as it was before the token, and the token's own key and value join the softmax
apart from it: the in-place write of the new k/v is then the cache's only other use in the decode loop body
(reading the updated cache made XLA copy every layer's cache every token). Numerics are model.forward.attend's:
scale, soft-cap THEN mask, float32 softmax over all keys; tests/test_sampler.py compares the two in both layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import GemmaConfig
from model.forward import MASK_VALUE, attention_mask, cpu_layouts, softcap


def decode_attend(q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid, window, cfg: GemmaConfig) -> jax.Array:
    """model.forward.attend for ONE query token q [B, 1, N, H] -> [B, 1, N, H]: the cache [B, K, S, H] as it was
    before this token, plus the token's own k_new, v_new [B, K, 1, H] (always visible to itself).

    Two layouts: on CPU the einsums are ordered so XLA's dots stream the cache rows as stored (attend's order
    transposes the cache every token); on an accelerator the keys are the minor axis and the new token's score
    joins the softmax without a concatenation, which on GPU was a slow strided reduction every layer and token
    (BUILD.md "Sampler").
    """
    if not cpu_layouts():
        return _decode_attend_keys_minor(q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid, window, cfg)
    b, _, n, h = q.shape
    qg = q.reshape(b, cfg.num_kv_heads, n // cfg.num_kv_heads, h)  # [B, K, G, H]
    past = jnp.einsum("bksh,bkgh->bksg", k_cache, qg, preferred_element_type=jnp.float32)  # [B, K, S, G]
    own = jnp.einsum("bkth,bkgh->bktg", k_new, qg, preferred_element_type=jnp.float32)  # [B, K, 1, G]
    scores = jnp.concatenate([past, own], axis=2) * cfg.query_pre_attn_scalar**-0.5  # [B, K, S+1, G]
    scores = softcap(scores, cfg.attn_softcap)  # soft-cap BEFORE masking
    mask = attention_mask(q_pos, k_pos, k_valid, window)[:, 0]  # [B, S]
    mask = jnp.concatenate([mask, jnp.ones((b, 1), bool)], axis=1)  # [B, S+1]
    probs = jax.nn.softmax(jnp.where(mask[:, None, :, None], scores, MASK_VALUE), axis=2).astype(v_cache.dtype)
    s = k_cache.shape[2]
    out = jnp.einsum("bksg,bksh->bkgh", probs[:, :, :s], v_cache) + jnp.einsum(
        "bktg,bkth->bkgh", probs[:, :, s:], v_new
    )  # [B, K, G, H]
    return out.reshape(b, 1, n, h)


def _decode_attend_keys_minor(q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid, window,
                              cfg: GemmaConfig) -> jax.Array:
    """decode_attend for accelerators: scores [B, K, G, S] (keys minor, reductions contiguous), the new token's
    own score [B, K, G] kept apart and folded into the softmax's max and sum."""
    b, _, n, h = q.shape
    qg = q.reshape(b, cfg.num_kv_heads, n // cfg.num_kv_heads, h)  # [B, K, G, H]
    scale = cfg.query_pre_attn_scalar**-0.5
    past = jnp.einsum("bksh,bkgh->bkgs", k_cache, qg, preferred_element_type=jnp.float32) * scale  # [B, K, G, S]
    own = jnp.einsum("bkh,bkgh->bkg", k_new[:, :, 0], qg, preferred_element_type=jnp.float32) * scale  # [B, K, G]
    past, own = softcap(past, cfg.attn_softcap), softcap(own, cfg.attn_softcap)  # soft-cap BEFORE masking
    mask = attention_mask(q_pos, k_pos, k_valid, window)[:, 0]  # [B, S]
    past = jnp.where(mask[:, None, None, :], past, MASK_VALUE)
    top = jnp.maximum(past.max(axis=-1), own)  # [B, K, G]
    e_past, e_own = jnp.exp(past - top[..., None]), jnp.exp(own - top)
    total = e_past.sum(axis=-1) + e_own  # [B, K, G]
    p_past = (e_past / total[..., None]).astype(v_cache.dtype)
    p_own = (e_own / total).astype(v_cache.dtype)
    out = jnp.einsum("bkgs,bksh->bkgh", p_past, v_cache) + p_own[..., None] * v_new  # [B, K, G, H]
    return out.reshape(b, 1, n, h)
