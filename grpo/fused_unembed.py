"""The training loss through the unembedding with its gradient made in the forward pass: 3 vocabulary matmuls, not 4.

`token_logprobs` (grpo/logprobs.py) checkpoints each chunk of logits, so differentiating it costs four
[tokens x V x D] matmuls: the logits, the same logits again in the backward pass, d(hidden) and d(embedding);
with V = 262k they are the largest ops of the training step (BUILD.md, "Training-step speed"). But every
GRPO loss here is a weighted sum over completion tokens of a function of that token's log-prob alone,

    loss = sum_t w_t * L(lp_t; old_t, ref_t, A_row)       (w_t: the loss_type's token weight, grpo/loss.py)

so dloss/dlp_t = w_t L'(lp_t) is known the moment lp_t is, and d(logits_t) = g_t (onehot(target_t) - p_t) / T.
Each chunk makes its logits once and leaves with its share of the loss, its log-probs and entropy (metrics),
d(hidden) and its part of d(embedding); the custom VJP's backward only scales those by the loss's cotangent.
Memory: still one chunk at a time, but a chunk holds three [B, c, V] float32 arrays at once (logits, softmax,
d(logits)) where the checkpointed path held one plus its recompute: +0.5 GB on README's main job (BUILD.md), plus
one float32 [D, V] embedding-gradient sum (full fine-tuning only) and, on CPU, the embedding transposed [D, V] for
d(hidden) (see `_forward`). (Liger-Kernel's fused linear cross-entropy
does this for plain cross-entropy: https://github.com/linkedin/Liger-Kernel.)

The log-probs come out of `chunk_logprobs`, the one definition every log-prob pass uses, so the ratio to
old log-probs from `make_step_logprobs` is exactly 1 at the first iteration. The lp and entropy outputs are
metrics: their cotangents are ignored (the caller stops their gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal

from grpo.logprobs import ChunkLayout, chunk_logprobs
from model.config import GemmaConfig
from model.forward import cpu_barrier, cpu_layouts, match_varying

# token_loss(lp [B, c], aux {name: [B, c]}) -> per-token loss L [B, c] (unweighted); aux["weight"] is w_t, and
# an optional aux["entropy_weight"] e_t adds the entropy bonus -e_t * H_t (GRPOConfig.entropy_coef).
TokenLoss = Callable[[jax.Array, dict], jax.Array]


def fused_token_loss(
    h: jax.Array, embed: jax.Array, tokens: jax.Array, aux: dict[str, jax.Array], token_loss: TokenLoss,
    model_cfg: GemmaConfig, *, chunk: int, temperature: float = 1.0, tail: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss = sum_t aux["weight"]_t * token_loss(lp)_t, logprobs [B, T], entropy [B, T]) from hidden states
    h [B, T, D], differentiable in h and embed [V, D]. aux: [B, T] float arrays (the weight among them)."""
    layout = ChunkLayout.of(h.shape, embed.shape[0], chunk, tail)
    names = sorted(aux)
    hs, targets, *cut = layout.split(h, tokens, *(aux[k].astype(jnp.float32) for k in names))
    # The custom backward returns cotangents of its inputs' own types: make h and the embedding vary over the
    # same mesh axes first (what a plain einsum does implicitly; the cast's transpose sums over the rest).
    hs, embed = match_varying(hs, embed)
    loss, lp, ent = _fused(hs, embed, targets, dict(zip(names, cut, strict=True)), token_loss, model_cfg,
                           temperature)
    return loss, jax.lax.stop_gradient(layout.join(lp)), jax.lax.stop_gradient(layout.join(ent))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hs, embed, targets, aux, token_loss, model_cfg, temperature):
    loss, lp, ent, _, _ = _forward(hs, embed, targets, aux, token_loss, model_cfg, temperature, embed_grad=False)
    return loss, lp, ent


def _fused_fwd(hs, embed, targets, aux, token_loss, model_cfg, temperature):
    # symbolic_zeros: each argument arrives as CustomVJPPrimal(value, perturbed); LoRA's frozen embedding is
    # not perturbed, so its [V, D] gradient is never made.
    embed_grad = embed.perturbed
    value = lambda tree: jax.tree.map(lambda a: a.value, tree, is_leaf=lambda a: isinstance(a, CustomVJPPrimal))
    hs, embed, targets, aux = value(hs), value(embed), value(targets), value(aux)
    loss, lp, ent, dh, de_t = _forward(hs, embed, targets, aux, token_loss, model_cfg, temperature, embed_grad)
    # de_t stays the one float32 [D, V] buffer until the backward pass transposes, scales and casts it in one go.
    return (loss, lp, ent), (dh, de_t, jnp.zeros((), embed.dtype))


def _fused_bwd(token_loss, model_cfg, temperature, res, cts):
    dh, de_t, embed_dtype = res
    ct = cts[0]  # the loss's cotangent; those of the lp / entropy metrics are ignored
    d_embed = None if de_t is None else (de_t.T * ct).astype(embed_dtype.dtype)
    return (dh * ct).astype(dh.dtype), d_embed, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _forward(hs, embed, targets, aux, token_loss, model_cfg: GemmaConfig, temperature: float, embed_grad: bool):
    """Scan over chunks: (loss, lp [C, B, c], entropy, d(loss)/d(hs) [C, B, c, D], d(loss)/d(embed) TRANSPOSED
    [D, V] float32, or None)."""
    vocab = embed.shape[0]
    # On XLA:CPU d(hidden) = dlogits @ E ([B*c, 262k] x [262k, D]) ran at ~2/3 the rate of the logits' own dot;
    # as E^T @ dlogits^T (both operands contracted on their minor axis) it matches it, for one transposed copy of
    # the embedding per step (+[D, V] float32 while the scan runs). GPU / TPU dots take either layout natively.
    embed_t = cpu_barrier(embed.T) if cpu_layouts() else None

    def one_chunk(de_t, xs):
        hc, tc, ac = xs  # [B, c, D], [B, c], {name: [B, c]}
        logits, logz, lp, p = chunk_logprobs(hc, tc, embed, model_cfg, temperature)  # p: softmax [B, c, V]
        ent = logz - jnp.sum(p * logits, axis=-1)
        weighted = lambda x: ac["weight"] * token_loss(x, ac)
        per_token, vjp = jax.vjp(weighted, lp)
        (g,) = vjp(jnp.ones_like(per_token))  # [B, c]: d(loss)/d(lp)
        onehot = jnp.arange(vocab, dtype=tc.dtype) == tc[..., None]  # [B, c, V]
        dlogits = g[..., None] * (onehot.astype(jnp.float32) - p) / temperature  # [B, c, V]
        if "entropy_weight" in ac:  # loss -= ew * H, and dH/dz = -p (log p + H)
            ew = ac["entropy_weight"]
            per_token = per_token - ew * ent
            log_p = logits - logz[..., None]
            dlogits = dlogits + (ew / temperature)[..., None] * p * (log_p + ent[..., None])
        if model_cfg.final_softcap is not None:  # logits = cap * tanh(z / cap): dz = dlogits * (1 - (logits/cap)^2)
            capped = logits * temperature / model_cfg.final_softcap
            dlogits = dlogits * (1.0 - capped * capped)
        dlogits = dlogits.astype(embed.dtype)
        if embed_t is None:
            dh = jnp.einsum("bcv,vd->bcd", dlogits, embed, preferred_element_type=jnp.float32)
        else:  # d(hidden)^T = E^T @ dlogits^T, both contracted on their last (262k) axis; the [D, B*c] result is tiny
            dh_t = jnp.einsum("dv,mv->dm", embed_t, dlogits.reshape(-1, vocab), preferred_element_type=jnp.float32)
            dh = cpu_barrier(dh_t).T.reshape(hc.shape)  # the barrier keeps XLA from folding .T back into the dot
        dh = dh.astype(hc.dtype)
        if de_t is not None:  # d(embed) accumulated TRANSPOSED, [D, V], from an explicit h^T [D, B*c]: XLA would
            # otherwise transpose the wide [B*c, V] dlogits inside the fusion that makes them (a strided write),
            # as in model/forward.py `dense`; the [D, V] sum is transposed once, after the last chunk.
            h_t = cpu_barrier(hc.reshape(-1, hc.shape[-1]).T)  # [D, B*c]
            de_t = de_t + jnp.matmul(h_t, dlogits.reshape(-1, vocab), preferred_element_type=jnp.float32)
        return de_t, (jnp.sum(per_token), lp, ent, dh)

    de0 = jnp.zeros(embed.shape[::-1], jnp.float32) if embed_grad else None
    if de0 is not None:  # the scan's carry varies over the mesh axes its updates do
        de0 = match_varying(de0, embed)[0]
    with jax.named_scope("fused_unembed"):
        de_t, (losses, lp, ent, dh) = jax.lax.scan(one_chunk, de0, (hs, targets, aux))
    return jnp.sum(losses), lp, ent, dh, de_t
