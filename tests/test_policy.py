"""One policy interface (grpo/policy.py): full fine-tuning and LoRA through the SAME step and log-prob builders
and the same calls, step(frozen, trained, opt_state, batch) and logprobs(frozen, trained, tokens, mask), on the
tiny Gemma 2 and 8 fake CPU devices (a (2, 4) mesh).

References and tolerances:
- The step's loss and metrics: grpo.grpo_loss (one device, no mesh) on policy.weights(frozen, trained) of the
  same mode: 1e-5 abs (float32, "highest" matmuls; as tests/test_grpo_step.py argues).
- Full fine-tuning through the policy interface against grpo.make_step (the entry point of before, params
  first): bitwise, new params and metrics.
- Fresh adapters (b = 0) make x @ W + (x @ a) @ 0 == x @ W exactly, so on CPU LoRA's log-probs equal the full
  policy's on the base params bitwise (XLA:GPU compiles x @ W differently once the adapter add follows it, so
  there only to rounding: the reason the trainer's LoRA reference runs through the adapter pass, not the base
  alone); the single-device grpo.logprobs within 1e-5 (chunked and sharded vs plain).
- One step: the frozen tree comes back bitwise unchanged, the trained tree moves (> 1e-4), and for LoRA the
  merged weights differ from the base only in the targeted matrices.
Compiles use XLA optimization level 0: same math, faster to compile on 2 cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import ragged_rows

import grpo
import model
from grpo.policy import FullPolicy, LoraPolicy, init_policy_state, make_policy
from model.lora import LoraConfig, with_adapters

FAST = {"xla_backend_optimization_level": 0}
TOL = 1e-5
B, T, PROMPT = 16, 12, 5
CFG = model.tiny_config("gemma2")
LCFG = LoraConfig(rank=4, targets=("q", "o", "down"))
GCFG = grpo.GRPOConfig(beta=0.04, epsilon_high=0.28, learning_rate=0.1, adam_eps=1.0, weight_decay=0.1,
                       max_grad_norm=1.0, logits_chunk=4)
POLICIES = {"full": FullPolicy(CFG), "lora": LoraPolicy(CFG, LCFG)}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _max_diff(a, b) -> float:
    return max([0.0, *jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - y))), a, b))])


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(model.init_params, static_argnums=1, compiler_options=FAST)(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    tokens, attention, completion = ragged_rows(rng, CFG.vocab_size, B, T, PROMPT, right_pad_mod=4)
    lp = np.asarray(grpo.logprobs(params, jnp.asarray(tokens), jnp.asarray(attention), CFG))
    batch = dict(tokens=tokens, attention_mask=attention, completion_mask=completion.astype(np.float32),
                 advantages=rng.normal(size=B).astype(np.float32),
                 old_logprobs=(lp + 0.3 * rng.normal(size=(B, T))).astype(np.float32),
                 ref_logprobs=(lp + 0.1 * rng.normal(size=(B, T))).astype(np.float32))
    return params, batch, grpo.make_mesh(2, 4)


def _start(policy, params, mesh, b_scale: float = 0.0):
    """(frozen, trained, opt_state) as the trainer builds them; b_scale != 0 moves LoRA's b off zero."""
    frozen, trained, opt_state = init_policy_state(policy, _copy(params), jax.random.key(1), GCFG, mesh)
    if b_scale and isinstance(policy, LoraPolicy):
        rng = np.random.default_rng(2)
        b = lambda shape: (b_scale * rng.normal(size=shape)).astype(np.float32)
        moved = {"layers": {t: {"a": np.asarray(p["a"]), "b": b(p["b"].shape)} for t, p in trained["layers"].items()}}
        trained = grpo.place_adapters(moved, CFG, LCFG, mesh)
    return frozen, trained, opt_state


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_one_step_builder_for_both_modes(setup, mode):
    """The same builder and call in both modes: the loss is grpo_loss of the mode's weights, only the trained
    tree moves, and full fine-tuning equals grpo.make_step's update bitwise."""
    params, batch, mesh = setup
    policy = POLICIES[mode]
    frozen, trained, opt_state = _start(policy, params, mesh, b_scale=0.05)
    weights = _host(policy.weights(frozen, trained))
    want_loss, want = jax.jit(grpo.grpo_loss, static_argnums=(2, 3), compiler_options=FAST)(
        weights, {k: jnp.asarray(v) for k, v in batch.items()}, CFG, GCFG)
    frozen_before, trained_before = _host(frozen), _host(trained)

    step = grpo.make_policy_step(policy, GCFG, mesh, compiler_options=FAST)
    new, new_opt, metrics = step(frozen, trained, opt_state, batch)
    # a batch with no token to learn from (every group masked out as without signal) leaves the state as it is:
    # AdamW moved the weights by its momentum and weight decay on the zero gradient, and advanced its schedule
    before = _host((new, new_opt))
    still, still_opt, empty = step(frozen, new, new_opt, {**batch, "completion_mask": 0 * batch["completion_mask"]})
    assert _max_diff((still, still_opt), before) == 0.0
    assert (float(empty["num_completion_tokens"]), float(empty["skipped"]), float(empty["loss"])) == (0, 0, 0)
    new, new_opt = before

    assert abs(float(metrics["loss"]) - float(want_loss)) <= TOL
    for k in ("pg_loss", "kl", "clip_frac", "entropy"):
        assert abs(float(metrics[k]) - float(want[k])) <= TOL, k
    assert 0 < float(metrics["clip_frac"]) < 0.5 and float(metrics["skipped"]) == 0
    assert _max_diff(frozen, frozen_before) == 0.0  # read, never updated (LoRA: the base; full: {})
    assert _max_diff(new, trained_before) > 1e-4
    if mode == "lora":  # the merged policy moved only where an adapter sits
        merged, base = _host(policy.merged(frozen, new)), _host(params)
        for name, leaf in merged["layers"].items():
            moved = float(np.max(np.abs(leaf - base["layers"][name])))
            assert (moved > 0) == (name in LCFG.targets), name
        assert np.array_equal(merged["embed"], base["embed"])
    else:  # the entry point of before: params first, no frozen tree
        p, o = grpo.init_train_state(_copy(params), CFG, GCFG, mesh)
        old_new, _, old_metrics = grpo.make_step(CFG, GCFG, mesh, compiler_options=FAST)(p, o, batch)
        assert _max_diff(new, _host(old_new)) == 0.0
        assert all(float(metrics[k]) == float(old_metrics[k]) for k in metrics)


def test_fresh_adapters_give_the_base_models_logprobs(setup):
    """One log-prob builder and call for both modes: LoRA at b = 0 equals full fine-tuning on the base params
    bitwise (the trainer's KL reference for LoRA), and both equal one-device grpo.logprobs within 1e-5; with
    b != 0 LoRA's log-probs move (> 1e-3) to those of base + adapters (1e-5)."""
    params, batch, mesh = setup
    rows = (batch["tokens"], batch["attention_mask"])

    def logprobs(policy, frozen, trained):
        return np.asarray(grpo.make_policy_logprobs(policy, mesh, chunk=4, compiler_options=FAST)(frozen, trained,
                                                                                                  *rows))

    full = logprobs(POLICIES["full"], *_start(POLICIES["full"], params, mesh)[:2])
    fresh = _start(POLICIES["lora"], params, mesh)
    assert all(float(jnp.max(jnp.abs(p["a"]))) > 0 for p in fresh[1]["layers"].values())
    assert np.array_equal(logprobs(POLICIES["lora"], *fresh[:2]), full)
    np.testing.assert_allclose(full, grpo.logprobs(params, *map(jnp.asarray, rows), CFG), atol=TOL, rtol=0)

    frozen, trained, _ = _start(POLICIES["lora"], params, mesh, b_scale=0.05)
    moved = logprobs(POLICIES["lora"], frozen, trained)
    assert float(np.max(np.abs(moved - full))) > 1e-3
    want = grpo.logprobs(with_adapters(params, _host(trained), LCFG), *map(jnp.asarray, rows), CFG)
    np.testing.assert_allclose(moved, want, atol=TOL, rtol=0)


def test_make_policy_decides_the_mode_once():
    """Rank 0 or no LoRA settings: full fine-tuning; equal settings give equal, equally hashed policies (the
    trainer's compile cache key); a LoRA policy of rank 0 is refused with the flag's name."""
    assert make_policy(CFG) == make_policy(CFG, LoraConfig(rank=0)) == FullPolicy(CFG)
    lora = make_policy(CFG, LoraConfig(4, targets=["q", "o", "down"]))
    assert lora == LoraPolicy(CFG, LoraConfig(4, 8.0, ("q", "o", "down"))) and hash(lora) == hash(POLICIES["lora"])
    assert FullPolicy(CFG).config_json() is None and lora.config_json()["rank"] == 4
    with pytest.raises(ValueError, match="--lora_rank > 0"):
        LoraPolicy(CFG, LoraConfig(rank=0))


def test_weights_load_straight_into_their_place_on_the_mesh(tmp_path):
    """Reference: the checkpoint loaded whole (no mesh) and grpo.place_params' layout. Loaded with the mesh, each
    leaf is already laid out as the step expects (so no whole copy stays on device 0) and equals the whole load
    bitwise; a sharded leaf's pieces are a quarter of it on a fsdp=4 mesh."""
    from tiny_model import make_tiny_model_dir

    from grpo.policy import load_on_mesh

    path = make_tiny_model_dir(tmp_path / "tiny")
    mesh = grpo.make_mesh(data=2, fsdp=4)
    cfg, whole = load_on_mesh(path, jnp.float32)
    _, placed = load_on_mesh(path, jnp.float32, mesh)
    want = grpo.place_params(whole, cfg, mesh)
    for (name, got), ref in zip(jax.tree_util.tree_leaves_with_path(placed), jax.tree.leaves(want), strict=True):
        assert got.sharding == ref.sharding, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    embed = placed["embed"]
    assert embed.addressable_shards[0].data.size * 4 == embed.size
