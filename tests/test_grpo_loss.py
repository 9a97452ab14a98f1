"""Hand-computed GRPO pieces: advantages, the clipped objective, k3 KL, aggregations, chunked logprobs, specs.

References are worked out by hand in the comments (the formulas in grpo/loss.py's docstring, as in DeepSeekMath's
GRPO, https://arxiv.org/abs/2402.03300, and DAPO, https://arxiv.org/abs/2503.14476); tolerances are
float32 rounding (1e-6) unless stated. The chunked logprobs are checked against a full log_softmax of
model.forward (1e-5).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grpo
import model
from grpo.sharding import logical_to_spec

P = jax.sharding.PartitionSpec
FAST = {"xla_backend_optimization_level": 0}  # same math, faster compiles on 2 cores


def _init(cfg, seed: int) -> dict:
    """model.init_params under one jit: the same weights, without ~10 s of op-by-op dispatch."""
    return jax.jit(model.init_params, static_argnums=1, compiler_options=FAST)(jax.random.key(seed), cfg)


# --- advantages --------------------------------------------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # two groups of G = 4


def test_advantages_group_std():
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025. Group 2: all equal -> 0.
    a = grpo.compute_advantages(REWARDS, 4, "group")
    np.testing.assert_allclose(a, [0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0], atol=1e-5)
    assert a.dtype == np.float32


def test_advantages_batch_std_and_none():
    # Batch: centred by group means (+-0.5, 0), divided by the std of all 8 rewards: mean 1.25, squared
    # deviations 0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 * 0.5625 = 5.5, unbiased std sqrt(5.5 / 7) = 0.886405
    # -> +-0.564076.
    np.testing.assert_allclose(grpo.compute_advantages(REWARDS, 4, "batch"),
                               [0.564076, -0.564076, -0.564076, 0.564076, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(grpo.compute_advantages(REWARDS, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_advantages_from_group_ids_in_any_order():
    # The same two groups, interleaved and labelled by strings: same advantages per row.
    ids = ["x", "y", "x", "y", "x", "y", "x", "y"]
    rewards = [1.0, 2.0, 0.0, 2.0, 0.0, 2.0, 1.0, 2.0]
    np.testing.assert_allclose(grpo.compute_advantages(rewards, ids, "group"),
                               [0.866025, 0, -0.866025, 0, -0.866025, 0, 0.866025, 0], atol=1e-5)


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="groups of num_generations=3"):
        grpo.compute_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match=">= 2 completions per group"):
        grpo.compute_advantages([1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.compute_advantages(REWARDS, 4, "std")


# --- the per-token objective -------------------------------------------------------------------------------------

ADV = jnp.array([1.0, -2.0, 0.5])


@pytest.mark.parametrize("loss_type", ["token_mean", "sequence_mean", "dr_grpo"])
def test_ratio_one_beta_zero_is_minus_mean_advantage(loss_type):
    # logp == old: ratio 1, pg_t = -A_i. Every row has 4 completion tokens (= max_completion_length), so all
    # three aggregations give -mean(A) = -(1 - 2 + 0.5) / 3 = 1/6.
    cfg = grpo.GRPOConfig(loss_type=loss_type, max_completion_length=4)
    logp = jnp.log(jnp.full((3, 6), 0.3))
    mask = jnp.zeros((3, 6)).at[:, 2:].set(1.0)
    t = grpo.per_token_loss(logp, logp, None, ADV, cfg)
    assert float(grpo.aggregate(t["loss"], mask, cfg, mask.sum(), 3)) == pytest.approx(1 / 6, abs=1e-6)


def test_token_mean_and_sequence_mean_weigh_rows_differently():
    # Rows with 1, 2 and 3 tokens. token_mean: -(1*1 - 2*2 + 0.5*3) / 6 = 0.25.
    # sequence_mean: -(1 - 2 + 0.5) / 3 = 1/6. dr_grpo (L = 4): -(1 - 4 + 1.5) / (3 * 4) = 0.125.
    logp = jnp.zeros((3, 3))
    mask = jnp.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], jnp.float32)
    want = {"token_mean": 0.25, "sequence_mean": 1 / 6, "dr_grpo": 0.125}
    for loss_type, value in want.items():
        cfg = grpo.GRPOConfig(loss_type=loss_type, max_completion_length=4)
        t = grpo.per_token_loss(logp, logp, None, ADV, cfg)
        assert float(grpo.aggregate(t["loss"], mask, cfg, mask.sum(), 3)) == pytest.approx(value, abs=1e-6)


def test_clip_engages_exactly_where_it_should():
    # eps_low 0.2, eps_high 0.28. A > 0: clipped iff ratio > 1.28; A < 0: clipped iff ratio < 0.8.
    # Where clipped, pg is the constant -clip(ratio) * A and d pg / d logp == 0; elsewhere -ratio * A.
    cfg = grpo.GRPOConfig(epsilon_low=0.2, epsilon_high=0.28)
    ratios = jnp.array([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0])
    old = jnp.zeros((2, 7))
    logp = jnp.log(jnp.stack([ratios, ratios]))
    adv = jnp.array([1.0, -1.0])
    t = grpo.per_token_loss(logp, old, None, adv, cfg)
    want_clipped = np.array([[0, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(t["clipped"], want_clipped)
    r = np.asarray(ratios)
    want_pg = np.stack([-np.minimum(r, 1.28), np.maximum(r, 0.8)])  # A = +1 then A = -1
    np.testing.assert_allclose(t["pg"], want_pg, atol=1e-6)
    grad = jax.grad(lambda lp: grpo.per_token_loss(lp, old, None, adv, cfg)["pg"].sum())(logp)
    np.testing.assert_array_equal(np.asarray(grad) == 0, want_clipped == 1)
    np.testing.assert_allclose(np.where(want_clipped, 0, grad), np.where(want_clipped, 0, -r * [[1], [-1]]),
                               atol=1e-6)  # d(-ratio * A)/d logp = -ratio * A


def test_k3_kl_zero_at_reference_and_positive_elsewhere():
    # k3 = exp(d) - d - 1 with d = ref - logp: 0 at d = 0; d = ln 2 gives 2 - 0.693147 - 1 = 0.306853.
    cfg = grpo.GRPOConfig(beta=0.5)
    logp = jnp.log(jnp.array([[0.1, 0.5, 0.9]]))
    same = grpo.per_token_loss(logp, logp, logp, jnp.zeros(1), cfg)
    np.testing.assert_array_equal(same["kl"], 0.0)
    shifted = grpo.per_token_loss(logp, logp, logp + jnp.log(2.0), jnp.zeros(1), cfg)
    np.testing.assert_allclose(shifted["kl"], 0.306853, atol=1e-6)
    np.testing.assert_allclose(shifted["loss"], 0.5 * 0.306853, atol=1e-6)  # A = 0: only beta * kl is left
    other = grpo.per_token_loss(logp, logp, logp - 0.3, jnp.zeros(1), cfg)
    assert bool(jnp.all(other["kl"] > 0))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo.per_token_loss(logp, logp, None, jnp.zeros(1), cfg)


@pytest.mark.parametrize("loss_type", ["token_mean", "sequence_mean", "dr_grpo"])
def test_a_drifted_padding_position_cannot_make_the_loss_nan(loss_type):
    # a masked (padding) position whose log-probs drifted 100-200 nats from the old / reference policy: exp of
    # that is float32 inf, and inf * mask 0 was NaN, so the NaN guard dropped the whole step
    cfg = grpo.GRPOConfig(beta=0.04, loss_type=loss_type, max_completion_length=2)
    old = ref = jnp.array([[-1.0, -100.0]])
    mask = jnp.array([[1.0, 0.0]])

    def loss(lp):
        return grpo.aggregate(grpo.per_token_loss(lp, old, ref, jnp.ones(1), cfg)["loss"], mask, cfg,
                              jnp.sum(mask), 1)

    for far in (-200.0, 50.0):
        lp = jnp.array([[-1.0, far]])
        value, grad = jax.value_and_grad(loss)(lp)
        want = -1.0 if loss_type != "dr_grpo" else -0.5  # ratio 1, A = 1, kl 0 on the one real token
        np.testing.assert_allclose(value, want, atol=1e-6)
        np.testing.assert_allclose(grad[0, 1], 0.0)  # nothing reaches the masked position
        assert bool(jnp.isfinite(grad).all())


def test_training_mask_drops_prompt_padding_and_truncated_rows():
    batch = {"completion_mask": jnp.array([[0, 1, 1], [0, 1, 1]]), "attention_mask": jnp.array([[1, 1, 0], [1, 1, 1]]),
             "truncated": jnp.array([False, True])}
    np.testing.assert_array_equal(grpo.training_mask(batch, grpo.GRPOConfig()), [[0, 1, 0], [0, 1, 1]])
    masked = grpo.GRPOConfig(mask_truncated_completions=True)
    np.testing.assert_array_equal(grpo.training_mask(batch, masked), [[0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="needs batch\\['truncated'\\]"):
        grpo.training_mask({k: v for k, v in batch.items() if k != "truncated"}, masked)


def test_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo.GRPOConfig(loss_type="mean")
    with pytest.raises(ValueError, match="set it"):
        grpo.GRPOConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_micro_batches must be >= 1"):
        grpo.GRPOConfig(num_micro_batches=0)


def test_schedule_warmup_then_cosine():
    # Linear warmup 0 -> lr over 10 steps, then cosine to 0 at step 110: half way (step 60) is lr / 2.
    s = grpo.make_schedule(grpo.GRPOConfig(learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine",
                                           total_steps=110))
    assert [float(s(i)) for i in (0, 5, 10, 60, 110)] == pytest.approx([0, 5e-4, 1e-3, 5e-4, 0], abs=1e-9)


# --- chunked logprobs --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(3, 4), compiler_options=FAST)
def _full_logprobs(params, tokens, attention, cfg, temperature=1.0):
    logits = model.forward(params, tokens, cfg, attention_mask=attention) / temperature
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.pad(lp, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0)))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_chunked_logprobs_match_full_log_softmax(arch):
    cfg = model.tiny_config(arch, num_layers=2)
    params = _init(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 3, cfg.vocab_size)
    attention = jnp.ones((3, 11), jnp.int32).at[0, :3].set(0).at[2, 8:].set(0)  # left and right padding
    want_lp, want_ent = _full_logprobs(params, tokens, attention, cfg, 0.7)
    h = jax.jit(model.hidden_states, static_argnums=2, compiler_options=FAST)(params, tokens, cfg,
                                                                               attention_mask=attention)
    chunked = jax.jit(grpo.token_logprobs, static_argnames=("model_cfg", "chunk", "temperature"), compiler_options=FAST)
    for chunk in (3, 256):  # 10 targets: 4 chunks with padding, and a single chunk
        lp, ent = chunked(h, params["embed"], tokens, model_cfg=cfg, chunk=chunk, temperature=0.7)
        np.testing.assert_allclose(lp, want_lp, atol=1e-5)
        np.testing.assert_allclose(ent, want_ent, atol=1e-5)
    assert float(jnp.abs(lp[:, 0]).max()) == 0.0  # position 0 has no context
    if arch == "gemma2":  # the public jitted entry point, temperature 1
        np.testing.assert_allclose(grpo.logprobs(params, tokens, attention, cfg), _full_logprobs(
            params, tokens, attention, cfg)[0], atol=1e-5)


@pytest.mark.parametrize("vocab", [256, 258])
def test_sharded_logprobs_equal_single_device(vocab):
    """V = 256 splits its rows over fsdp = 4 (local lookup); V = 258 does not, so D is split instead."""
    cfg = model.tiny_config("gemma3", num_layers=2, vocab_size=vocab)
    params = _init(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (8, 9), 3, cfg.vocab_size)
    attention = jnp.ones((8, 9), jnp.int32).at[1, :4].set(0)
    mesh = grpo.make_mesh(2, 4)
    placed = grpo.place_params(params, cfg, mesh)
    assert placed["embed"].sharding.spec == (P("fsdp", None) if vocab == 256 else P(None, "fsdp"))
    lp = grpo.make_sharded_logprobs(cfg, mesh, chunk=4, compiler_options=FAST)(placed, tokens, attention)
    np.testing.assert_allclose(lp, grpo.logprobs(params, tokens, attention, cfg), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 8"):
        grpo.make_sharded_logprobs(cfg, mesh)(placed, tokens[:6], attention[:6])


# --- the rules table ---------------------------------------------------------------------------------------------

def test_param_specs_follow_the_rules_table():
    mesh = grpo.make_mesh(2, 4)
    specs = grpo.param_specs(model.tiny_config("gemma3"), mesh)
    assert specs["embed"] == P("fsdp", None)  # vocab rows first; fsdp is then taken, so D stays whole
    assert specs["layers"]["q"] == P(None, "fsdp", None, None)
    assert specs["layers"]["o"] == P(None, None, None, "fsdp")
    assert specs["layers"]["q_norm"] == P(None, None)
    # Over fsdp = 4: V = 10 does not split, so D = 8 does; with D = 6 neither does: replicated.
    assert logical_to_spec((12, 8), ("vocab", "embed"), mesh) == P("fsdp", None)
    assert logical_to_spec((10, 8), ("vocab", "embed"), mesh) == P(None, "fsdp")
    assert logical_to_spec((10, 6), ("vocab", "embed"), mesh) == P(None, None)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec((4,), ("experts",), mesh)
    with pytest.raises(ValueError, match="needs 16 devices"):
        grpo.make_mesh(4, 4)
