"""Each GRPO group's prompt run once (model/shared_prompt.py, GRPOConfig.shared_prompt) against every row run whole.

Reference: the same functions with sharing off (group 1 / shared_prompt=False), which the sharded-step tests
check against plain single-device autodiff. Batches: 3-4 groups of 4 rows, prompts left-padded by different
amounts per group, completions right-padded to different lengths per row, sequences longer than the tiny
models' sliding window (8) so windows cross the prompt / completion boundary; Gemma 2 (soft-caps) and Gemma 3
(q/k norms). Tolerance 1e-5 (float32, "highest" matmul precision): the packed pass sums in a different order.
Compiles use XLA optimization level 0 (same math, faster to compile).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grpo
import model
from grpo import init_lora_state, make_lora_step
from grpo.rollout import check_shared_prompts
from model.lora import LoraConfig, init_adapters
from model.shared_prompt import prompt_sharing

FAST = {"xla_backend_optimization_level": 0}
G, PROMPT, TAIL = 4, 7, 6  # T = 13 > the tiny window of 8
TOL = 1e-5


def _batch(cfg, groups: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, t = groups * G, PROMPT + TAIL
    tokens = np.zeros((b, t), np.int32)
    attention = np.zeros((b, t), np.int32)
    for g in range(groups):
        pad = g % 3  # left padding of this group's prompt
        prompt = rng.integers(3, cfg.vocab_size, PROMPT - pad)
        for r in range(g * G, (g + 1) * G):
            n = TAIL - (r % 4)  # completion length of this row
            tokens[r, pad:PROMPT] = prompt
            tokens[r, PROMPT:PROMPT + n] = rng.integers(3, cfg.vocab_size, n)
            attention[r, pad:PROMPT + n] = 1
    completion = np.zeros((b, t), np.float32)
    completion[:, PROMPT:] = 1
    completion *= attention
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion,
            "advantages": rng.normal(size=b).astype(np.float32)}


def _params(cfg, seed=0):
    return jax.jit(model.init_params, static_argnums=1, compiler_options=FAST)(jax.random.key(seed), cfg)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_logprobs_with_shared_prompts_equal_whole_rows(arch):
    cfg = model.tiny_config(arch)
    mesh = grpo.make_mesh(data=1, fsdp=2)  # 2 groups per device: the FSDP lookup runs on the packed row
    batch = _batch(cfg, groups=4)
    params = grpo.place_params(_params(cfg), cfg, mesh)
    rows = (jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]))
    whole = grpo.make_sharded_logprobs(cfg, mesh, chunk=4, tail=TAIL, compiler_options=FAST)(params, *rows)
    shared = grpo.make_sharded_logprobs(cfg, mesh, chunk=4, tail=TAIL, group=G, compiler_options=FAST)(params, *rows)
    whole, shared = np.asarray(whole), np.asarray(shared)
    assert np.abs(whole[:, PROMPT:]).min() > 0  # real log-probs on the tail (a zero output cannot pass)
    np.testing.assert_allclose(shared, whole, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch,fused", [("gemma2", True), ("gemma3", True), ("gemma3", False)])
def test_step_with_shared_prompts_equals_whole_rows(arch, fused):
    """Params and metrics as the whole rows' step (TOL); and the step does less work: the FLOPs XLA counts for
    the compiled step (the program that ran) drop when prompts are shared (sharing silently off would fail)."""
    cfg = model.tiny_config(arch)
    mesh = grpo.make_mesh(data=2, fsdp=2)  # 1 group per device
    batch = _batch(cfg, groups=4, seed=1)
    base = grpo.GRPOConfig(num_generations=G, learning_rate=0.1, adam_eps=1.0, logits_chunk=4, logprob_tail=TAIL,
                           fused_unembed=fused, entropy_coef=0.01 if fused else 0.0,
                           entropy_control=None)
    out, flops = {}, {}
    for shared in (False, True):
        gcfg = grpo.GRPOConfig(**{**base.__dict__, "shared_prompt": shared})
        params, opt = grpo.init_train_state(_params(cfg), cfg, gcfg, mesh)
        step = grpo.make_step(cfg, gcfg, mesh, compiler_options=FAST).lower(params, opt, batch).compile()
        flops[shared] = step.cost_analysis()["flops"]
        new, _, metrics = step(params, opt, batch)
        out[shared] = (jax.device_get(new), jax.device_get(metrics))
    assert flops[True] < 0.9 * flops[False], flops
    (p0, m0), (p1, m1) = out[False], out[True]
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), p0, jax.device_get(_params(cfg)))
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step changed the weights: the comparison below means something
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=0), p1, p0)
    for k in ("loss", "grad_norm", "entropy", "num_completion_tokens"):
        np.testing.assert_allclose(m1[k], m0[k], atol=TOL, rtol=1e-5, err_msg=k)


def test_lora_step_with_shared_prompts_equals_whole_rows():
    """LoRA (frozen base), remat and 2 micro-batches of 2 groups each on a 2-device fsdp mesh."""
    cfg, lcfg = model.tiny_config("gemma3"), LoraConfig(rank=4, alpha=8.0)
    mesh = grpo.make_mesh(data=1, fsdp=2)
    batch = _batch(cfg, groups=8, seed=2)
    params = _params(cfg)
    adapters = jax.jit(init_adapters, static_argnums=(1, 2))(jax.random.key(1), cfg, lcfg)
    out = {}
    for shared in (False, True):
        gcfg = grpo.GRPOConfig(num_generations=G, learning_rate=0.1, adam_eps=1.0, logits_chunk=4, logprob_tail=TAIL,
                               num_micro_batches=2, remat=True, shared_prompt=shared)
        base = grpo.place_params(jax.tree.map(jnp.copy, params), cfg, mesh)
        ad, opt = init_lora_state(jax.tree.map(jnp.copy, adapters), cfg, lcfg, gcfg, mesh)
        new, _, metrics = make_lora_step(cfg, lcfg, gcfg, mesh, compiler_options=FAST)(ad, opt, batch, base)
        out[shared] = (jax.device_get(new), jax.device_get(metrics))
    (a0, m0), (a1, m1) = out[False], out[True]
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), a0, adapters))) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=0), a1, a0)
    np.testing.assert_allclose(m1["loss"], m0["loss"], atol=TOL, rtol=1e-5)


def test_sharing_applies_only_to_whole_groups_with_a_tail():
    assert prompt_sharing(8, 13, 4, 6).prompt_len == 7
    assert prompt_sharing(8, 13, 4, None) is None  # no prompt / completion split
    assert prompt_sharing(6, 13, 4, 6) is None  # rows are not whole groups
    assert prompt_sharing(8, 13, 1, 6) is None
    assert prompt_sharing(8, 13, 4, 13) is None  # nothing before the tail


def test_trainer_refuses_groups_whose_prompts_differ():
    batch = _batch(model.tiny_config("gemma3"), groups=2)
    check_shared_prompts(batch, G, TAIL)  # built with shared prompts: passes
    batch["tokens"][5, PROMPT - 1] += 1  # row 5 (group 1) now has another prompt
    with pytest.raises(ValueError, match="group 1 differ in tokens"):
        check_shared_prompts(batch, G, TAIL)
