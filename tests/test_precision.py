"""One precision for every log-prob: the old- and reference-policy passes compute exactly what the step does.

Setup: tiny Gemma 2, float32 params, GRPOConfig.compute_dtype="bfloat16", a (2, 4) mesh of fake CPU devices,
2 micro-batches with remat, a log-prob tail, chunked logits: the trainer's settings. Log-probs come from
grpo.logprobs.make_step_logprobs (all settings read from the GRPOConfig).

Reference: exact equality, no tolerance. With epsilon_low = epsilon_high = 0 the clip is active on every token
whose ratio is above 1 (advantage +1) or below 1 (advantage -1), so clip_frac == 0 under both signs means
ratio == 1 on every completion token; the KL metric is exactly 0 when the reference IS the policy. The
float32 pass the trainer used before (no compute dtype) misses both by far (max |d logp| ~0.07), which the
test also checks, so it could fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import ragged_rows

import grpo
import model
from grpo import init_lora_state, make_lora_step
from grpo.logprobs import make_sharded_logprobs, make_step_logprobs
from model.lora import LoraConfig, init_adapters

FAST = {"xla_backend_optimization_level": 0}
B, T, PROMPT, TAIL = 16, 16, 6, 10
CFG = model.tiny_config("gemma2")
GCFG = grpo.GRPOConfig(beta=0.04, epsilon_low=0.0, epsilon_high=0.0, learning_rate=0.1, compute_dtype="bfloat16",
                       num_micro_batches=2, remat=True, logits_chunk=4, logprob_tail=TAIL)
LCFG = LoraConfig(rank=4)


@pytest.fixture(scope="module")
def setup():
    init = lambda key: (model.init_params(key, CFG), init_adapters(jax.random.fold_in(key, 1), CFG, LCFG))
    params, adapters = jax.jit(init, compiler_options=FAST)(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens, attention, completion = ragged_rows(rng, CFG.vocab_size, B, T, PROMPT, right_pad_mod=4)
    batch = dict(tokens=tokens, attention_mask=attention, completion_mask=completion.astype(np.float32))
    mesh = grpo.make_mesh(2, 4)
    return params, adapters, batch, mesh, make_step_logprobs(CFG, GCFG, mesh, compiler_options=FAST)


def _signed(batch: dict, sign: float) -> dict:
    return {**batch, "advantages": np.full(B, sign, np.float32)}


def _check_ratio_one_and_kl_zero(run_step, batch: dict, old: jax.Array, ref: jax.Array) -> None:
    for sign in (1.0, -1.0):
        with_old = run_step({**_signed(batch, sign), "old_logprobs": old, "ref_logprobs": ref})
        without = run_step({**_signed(batch, sign), "ref_logprobs": ref})  # old = stop_gradient(logp)
        assert float(with_old["clip_frac"]) == 0.0, sign
        assert float(with_old["kl"]) == 0.0 and float(without["kl"]) == 0.0
        assert float(with_old["pg_loss"]) == float(without["pg_loss"]) == -sign
        assert float(with_old["loss"]) == float(without["loss"])


def test_full_fine_tuning_old_and_ref_logprobs_equal_the_steps(setup):
    params, _, batch, mesh, logprobs_fn = setup
    step = grpo.make_step(CFG, GCFG, mesh, compiler_options=FAST)

    def run_step(b):
        p, o = grpo.init_train_state(jax.tree.map(jnp.copy, params), CFG, GCFG, mesh)  # a copy: the step donates
        return step(p, o, b)[2]

    placed = grpo.place_params(jax.tree.map(jnp.copy, params), CFG, mesh)
    lp = logprobs_fn(placed, batch["tokens"], batch["attention_mask"])
    _check_ratio_one_and_kl_zero(run_step, batch, old=lp, ref=lp)

    # What the trainer did before: the same pass in the params' float32. The step (bf16) disagrees with it.
    f32 = make_sharded_logprobs(CFG, mesh, chunk=GCFG.logits_chunk, tail=TAIL, compiler_options=FAST)
    lp32 = f32(placed, batch["tokens"], batch["attention_mask"])
    metrics = run_step({**_signed(batch, 1.0), "old_logprobs": lp32, "ref_logprobs": lp32})
    assert float(metrics["kl"]) > 1e-6 and float(metrics["clip_frac"]) > 0.1


def test_lora_old_logprobs_and_base_reference_equal_the_steps(setup):
    """LoRA: old log-probs from base + adapters (b != 0) give ratio 1 everywhere; with fresh adapters (b = 0)
    the reference pass on the base params alone equals the policy bitwise, so the KL is exactly 0."""
    params, fresh, batch, mesh, logprobs_fn = setup
    step = make_lora_step(CFG, LCFG, GCFG, mesh, compiler_options=FAST)
    lora_logprobs = make_step_logprobs(CFG, GCFG, mesh, lora_cfg=LCFG, compiler_options=FAST)
    base = grpo.place_params(jax.tree.map(jnp.copy, params), CFG, mesh)
    rng = np.random.default_rng(1)
    trained = {"layers": {t: {"a": p["a"], "b": jnp.asarray(0.05 * rng.normal(size=p["b"].shape), jnp.float32)}
                          for t, p in fresh["layers"].items()}}

    def run_step(adapters, b):
        ad, o = init_lora_state(jax.tree.map(jnp.copy, adapters), CFG, LCFG, GCFG, mesh)
        return step(ad, o, b, base)[2]

    ref = logprobs_fn(base, batch["tokens"], batch["attention_mask"])
    placed_fresh = init_lora_state(jax.tree.map(jnp.copy, fresh), CFG, LCFG, GCFG, mesh)[0]
    assert np.array_equal(np.asarray(lora_logprobs(base, placed_fresh, batch["tokens"], batch["attention_mask"])),
                          np.asarray(ref))
    _check_ratio_one_and_kl_zero(lambda b: run_step(fresh, b), batch, old=ref, ref=ref)

    placed = init_lora_state(jax.tree.map(jnp.copy, trained), CFG, LCFG, GCFG, mesh)[0]
    old = lora_logprobs(base, placed, batch["tokens"], batch["attention_mask"])
    assert float(jnp.max(jnp.abs(old - ref))) > 1e-3  # the adapters do change the policy
    for sign in (1.0, -1.0):
        metrics = run_step(trained, {**_signed(batch, sign), "old_logprobs": old, "ref_logprobs": ref})
        assert float(metrics["clip_frac"]) == 0.0 and float(metrics["pg_loss"]) == -sign
        assert float(metrics["kl"]) > 0


def test_rollouts_sample_in_the_compute_dtype(setup):
    """Under bf16 compute the sampler gets a bf16 copy (half the weight and KV-cache bytes; the machine presets'
    rollout bound counts on it); without a compute dtype it gets the params as stored. LoRA: merged, then cast."""
    import types

    from grpo.policy import FullPolicy, LoraPolicy
    from grpo.trainer import LoopState, policy_params

    params, adapters = setup[0], setup[1]
    for compute, want in (("bfloat16", jnp.bfloat16), (None, jnp.float32)):
        ctx = types.SimpleNamespace(policy=FullPolicy(CFG), frozen={}, grpo_cfg=grpo.GRPOConfig(compute_dtype=compute))
        got = policy_params(ctx, LoopState(params=params, opt_state=None))
        assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(want)}
    ctx = types.SimpleNamespace(policy=LoraPolicy(CFG, LCFG), frozen=params, grpo_cfg=GCFG)
    got = policy_params(ctx, LoopState(params=adapters, opt_state=None))
    assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.structure(got) == jax.tree.structure(params)
