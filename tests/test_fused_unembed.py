"""grpo/fused_unembed.py against autodiff: the loss and its gradients in the hidden states and the embedding.

Reference: the same loss written the plain way (grpo.token_logprobs, whose chunks are checkpointed, then
grpo.loss's per-token loss and aggregation) differentiated by jax.grad. Same math in another order, so the
tolerances are float32 rounding of sums over a 384-row vocabulary (rtol 1e-4 on gradients, 1e-5 on the loss);
the log-probs match to float32 rounding (1e-6), the entropy metric to 1e-5 (a cancelling sum).
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grpo
import model
from grpo import loss as objective
from grpo.fused_unembed import fused_token_loss
from model.forward import compiling_for_accelerator

B, T, V, D = 4, 12, 384, 16


def _inputs(seed: int, with_old: bool, with_ref: bool) -> dict:
    k = jax.random.split(jax.random.key(seed), 6)
    mask = (jnp.arange(T)[None, :] >= jnp.array([[5], [6], [7], [5]])).astype(jnp.float32)
    mask = mask.at[1, -2:].set(0.0)  # a shorter completion: trailing padding
    batch = {"tokens": jax.random.randint(k[0], (B, T), 0, V), "advantages": jax.random.normal(k[1], (B,)),
             "completion_mask": mask, "attention_mask": jnp.ones((B, T), jnp.int32)}
    if with_old:  # ratios off 1 on both sides of the clip range
        batch["old_logprobs"] = -6.0 + 0.5 * jax.random.normal(k[2], (B, T))
    if with_ref:
        batch["ref_logprobs"] = -6.0 + 0.5 * jax.random.normal(k[3], (B, T))
    return {"batch": batch, "h": jax.random.normal(k[4], (B, T, D)),
            "embed": 0.5 * jax.random.normal(k[5], (V, D))}


def _reference(h, embed, batch, cfg, gcfg, tail):
    logp, ent = grpo.token_logprobs(h, embed, batch["tokens"], cfg, chunk=gcfg.logits_chunk,
                                    temperature=gcfg.temperature, tail=tail)
    mask = batch["completion_mask"]
    loss, _ = objective.policy_loss(logp, ent, batch, mask, gcfg, jnp.sum(mask), B)
    return loss, (logp, ent)


def _fused(h, embed, batch, cfg, gcfg, tail):
    mask = batch["completion_mask"]
    aux = objective.fused_aux(batch, mask, gcfg, jnp.sum(mask), B)
    loss, logp, ent = fused_token_loss(h, embed, batch["tokens"], aux, objective.token_loss_fn(gcfg, "old" in aux),
                                       cfg, chunk=gcfg.logits_chunk, temperature=gcfg.temperature, tail=tail)
    return loss, (logp, ent)


@pytest.mark.parametrize("arch,loss_type,with_old,beta,tail,chunk", [
    ("gemma3", "token_mean", False, 0.0, None, 256),  # ratio 1, every position, one chunk
    ("gemma3", "token_mean", True, 0.04, 8, 3),  # clipped ratios, k3 KL, a tail in chunks of 3 (last padded)
    ("gemma2", "sequence_mean", True, 0.0, 9, 4),  # Gemma 2's final soft-cap in the gradient
    ("gemma2", "dr_grpo", False, 0.04, None, 5),
])
def test_fused_loss_and_gradients_match_autodiff(arch, loss_type, with_old, beta, tail, chunk):
    cfg = model.tiny_config(arch, vocab_size=V, embed_dim=D)
    gcfg = grpo.GRPOConfig(num_generations=2, loss_type=loss_type, beta=beta, temperature=0.7, logits_chunk=chunk,
                           max_completion_length=T, epsilon_low=0.1, epsilon_high=0.1)
    x = _inputs(1, with_old, beta > 0)
    grads = {}
    for name, fn in (("ref", _reference), ("fused", _fused)):
        f = jax.jit(jax.value_and_grad(lambda h, e, fn=fn: fn(h, e, x["batch"], cfg, gcfg, tail), argnums=(0, 1),
                                       has_aux=True))
        grads[name] = f(x["h"], x["embed"])
    (loss_r, (lp_r, ent_r)), (dh_r, de_r) = grads["ref"]
    (loss_f, (lp_f, ent_f)), (dh_f, de_f) = grads["fused"]
    # The same chunk code, compiled into different fusions here (the reference under jvp): 1-ulp differences.
    # That the step's log-probs equal the forward-only old-policy pass exactly is tests/test_precision.py's check.
    np.testing.assert_allclose(lp_f, lp_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent_f, ent_r, rtol=1e-5, atol=1e-5)  # logz - sum(p z): a cancelling sum
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(dh_r))) > 1e-4 and float(jnp.max(jnp.abs(de_r))) > 1e-4  # a real gradient
    np.testing.assert_allclose(dh_f, dh_r, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(de_f, de_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("for_accelerator", [False, True])
def test_both_layouts_of_d_hidden_match_autodiff(for_accelerator):
    """d(hidden) as E^T @ dlogits^T with the embedding transposed once (XLA:CPU's layout) and as dlogits @ E (what
    TPU / GPU run, and what bin/inspect's accelerator estimates trace): both equal autodiff's."""
    cfg = model.tiny_config("gemma3", vocab_size=V, embed_dim=D)
    gcfg = grpo.GRPOConfig(num_generations=2, logits_chunk=4)
    x = _inputs(3, True, False)
    grad = lambda fn: jax.jit(jax.grad(lambda h, e: fn(h, e, x["batch"], cfg, gcfg, 8)[0], argnums=(0, 1)))
    with compiling_for_accelerator() if for_accelerator else contextlib.nullcontext():
        fused = grad(_fused)
        text = fused.lower(x["h"], x["embed"]).as_text()
        got = fused(x["h"], x["embed"])
    want = grad(_reference)(x["h"], x["embed"])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    transposed_embed = re.compile(rf"stablehlo.transpose .*\(tensor<{V}x{D}xf32>\) -> tensor<{D}x{V}xf32>")
    assert bool(transposed_embed.search(text)) == (not for_accelerator)  # the layout really switched


def test_frozen_embedding_gets_no_gradient_work():
    """LoRA freezes the embedding: only d(hidden) is asked for, and it matches autodiff's."""
    cfg = model.tiny_config("gemma3", vocab_size=V, embed_dim=D)
    gcfg = grpo.GRPOConfig(num_generations=2, logits_chunk=4)
    x = _inputs(2, True, False)
    ref = jax.jit(jax.grad(lambda h: _reference(h, x["embed"], x["batch"], cfg, gcfg, 8)[0]))(x["h"])
    fused = jax.jit(jax.grad(lambda h: _fused(h, x["embed"], x["batch"], cfg, gcfg, 8)[0]))
    np.testing.assert_allclose(fused(x["h"]), ref, rtol=1e-4, atol=1e-6)
    embed_grad = re.compile(rf"dot_general.*-> tensor<({V}x{D}|{D}x{V})xf32>")  # the embedding gradient's matmul
    assert not embed_grad.search(fused.lower(x["h"]).as_text())
    both = jax.jit(jax.grad(lambda h, e: _fused(h, e, x["batch"], cfg, gcfg, 8)[0], argnums=(0, 1)))
    assert embed_grad.search(both.lower(x["h"], x["embed"]).as_text())  # the control: there when it is needed


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_entropy_bonus_matches_autodiff(arch):
    """entropy_coef: the fused loss minus coef x the loss_type mean of each completion token's entropy, whose
    gradient (-p (log p + H) per logit) is checked against jax.grad of the entropy of full log_softmax logits."""
    from model.forward import unembed

    cfg = model.tiny_config(arch, vocab_size=V, embed_dim=D)
    coef, tail, temp = 0.3, 8, 0.7
    gcfg = grpo.GRPOConfig(num_generations=2, entropy_coef=coef, temperature=temp, logits_chunk=3)
    x = _inputs(3, True, False)

    def reference(h, e):
        loss, _ = _reference(h, e, x["batch"], cfg, gcfg, tail)
        logp = jax.nn.log_softmax(unembed({"embed": e}, h[:, :-1], cfg) / temp, axis=-1)  # [B, T-1, V]
        ent = jnp.pad(-jnp.sum(jnp.exp(logp) * logp, axis=-1), ((0, 0), (1, 0)))  # [B, T]: position t's entropy
        mask = x["batch"]["completion_mask"] * (jnp.arange(T) >= T - tail)[None, :]
        return loss - coef * jnp.sum(objective.token_weights(mask, gcfg, jnp.sum(mask), B) * ent)

    def fused(h, e):
        mask = x["batch"]["completion_mask"] * (jnp.arange(T) >= T - tail)[None, :]
        aux = objective.fused_aux(x["batch"], mask, gcfg, jnp.sum(mask), B)
        return fused_token_loss(h, e, x["batch"]["tokens"], aux, objective.token_loss_fn(gcfg, True), cfg,
                                chunk=3, temperature=temp, tail=tail)[0]

    (lr, gr), (lf, gf) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x["h"], x["embed"]) for f in (reference, fused))
    without = jax.jit(lambda h, e: _reference(h, e, x["batch"], cfg, gcfg, tail)[0])(x["h"], x["embed"])
    assert abs(float(lr - without)) > 1e-3  # the bonus is really in the reference
    np.testing.assert_allclose(lf, lr, rtol=1e-5, atol=1e-6)
    for a, b in zip(gf, gr, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_entropy_bonus_needs_the_fused_path():
    with pytest.raises(ValueError, match="entropy_coef > 0 needs fused_unembed"):
        grpo.GRPOConfig(entropy_coef=0.01, fused_unembed=False)
    cfg = model.tiny_config("gemma3", vocab_size=V, embed_dim=D)
    with pytest.raises(ValueError, match="grpo_loss has no entropy bonus"):  # the reference cannot silently drop it
        grpo.grpo_loss({}, _inputs(0, False, False)["batch"], cfg, grpo.GRPOConfig(entropy_coef=0.01))


def test_entropy_coef_as_batch_data():
    """batch["entropy_coef"] (the adaptive controller's coefficient, one per row so it never recompiles the step)
    gives the same loss and gradients as the same fixed GRPOConfig.entropy_coef (1e-6), and a row whose
    coefficient is 0 gets no entropy weight (exactly)."""
    cfg = model.tiny_config("gemma3", vocab_size=V, embed_dim=D)
    x = _inputs(5, True, False)
    mask = x["batch"]["completion_mask"]
    fixed, plain = grpo.GRPOConfig(num_generations=2, entropy_coef=0.2), grpo.GRPOConfig(num_generations=2)

    def loss(h, e, batch, gcfg):
        aux = objective.fused_aux(batch, mask, gcfg, jnp.sum(mask), B)
        return fused_token_loss(h, e, batch["tokens"], aux, objective.token_loss_fn(gcfg, True), cfg, chunk=3)[0]

    as_data = {**x["batch"], "entropy_coef": jnp.full((B,), 0.2)}
    a, b = (jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=3)(x["h"], x["embed"], batch, gcfg)
            for batch, gcfg in ((as_data, plain), (x["batch"], fixed)))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    for ga, gb in zip(a[1], b[1], strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-9)
    per_row = {**x["batch"], "entropy_coef": jnp.array([0.0, 0.2, 0.0, 0.1])}
    w = objective.fused_aux(per_row, mask, plain, jnp.sum(mask), B)["entropy_weight"]
    assert float(jnp.abs(w[0]).sum()) == 0.0 and float(jnp.abs(w[1]).sum()) > 0.0
