"""LoRA adapters (model/lora.py) and the LoRA GRPO step (grpo/policy.py LoraPolicy through grpo/step.py, called
here by its adapters-first entry point grpo.step.make_lora_step), on 8 fake CPU devices.

References and tolerances:
- b = 0: the adapted forward IS the base forward: logits equal bitwise (x @ W + 0).
- Gradients: directional derivatives of the one-device loss w.r.t. the adapters against central differences,
  eps = 3e-2 on unit directions, float32 (the forward keeps norms, RoPE and logits in float32 on purpose, so
  x64 would not help); tolerance 1e-2 relative + 1e-5 absolute, as tests/test_grpo_step.py argues.
- The sharded step: against `_reference_update`, plain single-device math (model.forward on base + adapters,
  log_softmax, the GRPO pieces, jax.grad, optax.clip_by_global_norm, the same AdamW); 1e-5 max abs on the
  new adapters and the metrics. Adam eps = 1 so the update is ~lr * g and checks the gradient's scale
  (with 1e-8 it is ~lr * sign(g); see tests/test_grpo_step.py).
- merge: W + a @ b * scale against the unmerged x @ W + (x @ a) @ b * scale; the two differ only by float32
  rounding of a different summation order: 1e-4 max abs on logits of size ~5 (measured ~5e-6).
Compiles use XLA optimization level 0: same math, faster to compile on 2 cores.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batches import ragged_rows
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import grpo
import model
from grpo import init_lora_state, make_lora_step
from grpo.policy import make_lora_optimizer
from grpo.sharding import adapter_specs
from model.lora import LoraConfig, init_adapters, lora_schema, merge, validate_lora, with_adapters

FAST = {"xla_backend_optimization_level": 0}
TOL = 1e-5
B, T, PROMPT = 32, 16, 6
CFG = model.tiny_config("gemma2")
LCFG = LoraConfig(rank=4, alpha=8.0)
GCFG = grpo.GRPOConfig(beta=0.04, epsilon_high=0.28, learning_rate=0.1, adam_eps=1.0, weight_decay=0.1,
                       max_grad_norm=1.0, logits_chunk=4)


def _init(cfg, lora_cfg, seed: int) -> tuple[dict, dict]:
    """model.init_params and init_adapters under one jit: the same weights, without op-by-op dispatch."""
    init = lambda key: (model.init_params(key, cfg), init_adapters(jax.random.fold_in(key, 1), cfg, lora_cfg))
    return jax.jit(init, compiler_options=FAST)(jax.random.key(seed))


def _params_and_adapters(seed: int = 0, b_scale: float = 0.05):
    """Random base params and adapters with b != 0 (at b = 0 the gradient of every `a` is exactly 0)."""
    params, adapters = _init(CFG, LCFG, seed)
    rng = np.random.default_rng(seed)
    for pair in adapters["layers"].values():
        pair["b"] = jnp.asarray(b_scale * rng.normal(size=pair["b"].shape), jnp.float32)
    return params, adapters


def _batch(params, adapters, rng) -> tuple[dict, np.ndarray]:
    """Left-padded prompts, right-padded completions, old/ref log-probs off the current ones so the clip
    engages. Also returns the current policy's logprobs [B, T]."""
    tokens, attention, completion = ragged_rows(rng, CFG.vocab_size, B, T, PROMPT, right_pad_mod=5)
    lp = np.asarray(grpo.logprobs(with_adapters(params, adapters, LCFG), jnp.asarray(tokens), jnp.asarray(attention),
                                  CFG))
    batch = dict(tokens=tokens, attention_mask=attention, completion_mask=completion,
                 advantages=rng.normal(size=B).astype(np.float32),
                 old_logprobs=(lp + 0.3 * rng.normal(size=(B, T))).astype(np.float32),
                 ref_logprobs=(lp + 0.1 * rng.normal(size=(B, T))).astype(np.float32))
    return batch, lp


def _token_logprobs(weights, batch):
    logits = model.forward(weights, batch["tokens"], CFG, attention_mask=batch["attention_mask"])  # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))  # [B, T]


def _reference_update(params, adapters, batch, gcfg):
    """One device, no chunking, no shard_map: the adapters' AdamW update from the full-logits loss."""
    def loss_fn(ad):
        lp = _token_logprobs(with_adapters(params, ad, LCFG), batch)
        mask = batch["completion_mask"] * batch["attention_mask"]
        t = grpo.per_token_loss(lp, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"], gcfg)
        return grpo.aggregate(t["loss"], mask, gcfg, mask.sum(), B), t

    @jax.jit
    def update(adapters, batch):
        (loss, t), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
        tx = optax.chain(optax.clip_by_global_norm(gcfg.max_grad_norm), make_lora_optimizer(gcfg))
        updates, _ = tx.update(grads, tx.init(adapters), adapters)
        mask = batch["completion_mask"] * batch["attention_mask"]
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "kl": (t["kl"] * mask).sum() / mask.sum(),
                   "clip_frac": (t["clipped"] * mask).sum() / mask.sum(), "num_completion_tokens": mask.sum()}
        return optax.apply_updates(adapters, updates), metrics

    return update(adapters, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def setup():
    params, adapters = _params_and_adapters()
    batch, lp = _batch(params, adapters, np.random.default_rng(0))
    want_adapters, want_metrics = _reference_update(params, adapters, batch, GCFG)
    return params, adapters, batch, want_adapters, want_metrics, lp


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_zero_b_leaves_the_model_exactly_as_it_was(arch):
    """Fresh adapters (b = 0, a random) on every target: logits bitwise equal to the base model's."""
    cfg = model.tiny_config(arch)
    params, adapters = _init(cfg, LoraConfig(rank=8), 0)
    assert all(float(jnp.max(jnp.abs(p["a"]))) > 0 for p in adapters["layers"].values())
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)), jnp.int32)
    fwd = jax.jit(model.forward, static_argnums=2, compiler_options=FAST)
    base = fwd(params, tokens, cfg)
    assert bool(jnp.all(fwd(with_adapters(params, adapters, LoraConfig(rank=8)), tokens, cfg) == base))


def test_adapter_gradients_match_finite_differences(setup):
    """d loss / d adapters (grpo.grpo_loss on base + adapters, one device) along unit directions over all
    adapters, only the a's, only the b's, and one target's pair, against central differences."""
    params, adapters, full, _, _, lp = setup
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(2, B, T))
    batch = {**full, "old_logprobs": lp + 0.05 * noise[0], "ref_logprobs": lp + 0.1 * noise[1]}
    gcfg = grpo.GRPOConfig(beta=0.1, loss_type="sequence_mean", logits_chunk=5)
    loss_of = lambda ad: grpo.grpo_loss(with_adapters(params, ad, LCFG), batch, CFG, gcfg)[0]
    loss = jax.jit(loss_of, compiler_options=FAST)
    grads = jax.jit(jax.grad(loss_of), compiler_options=FAST)(adapters)
    eps = 3e-2
    for only in (None, "a", "b", "down"):
        d = _direction(adapters, only, rng)
        analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True))
        plus, minus = (float(loss(jax.tree.map(lambda p, v, s=s: p + s * v, adapters, d))) for s in (eps, -eps))
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic) > 1e-4, only  # a direction the loss actually depends on
        assert abs(analytic - numeric) <= 1e-2 * abs(analytic) + 1e-5, (only, analytic, numeric)


def _direction(tree, only, rng):
    """A random unit-norm direction over every leaf, or over the leaves whose path contains `only`."""
    def one(path, x):
        on = only is None or only in [p.key for p in path]
        return jnp.asarray(rng.normal(size=x.shape) * on, x.dtype)

    d = jax.tree_util.tree_map_with_path(one, tree)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(d)))
    return jax.tree.map(lambda v: v / norm, d)


@pytest.mark.parametrize("mesh_shape, micro, remat", [((8, 1), 1, False), ((1, 8), 2, False), ((2, 4), 4, True)])
def test_sharded_lora_step_equals_single_device(setup, mesh_shape, micro, remat):
    """Each mesh, 1/2/4 micro-batches, with and without remat: the reference update of the adapters; the base
    params come back bitwise unchanged and the optimizer state holds adapter-shaped moments only."""
    params, adapters, batch, want_adapters, want, _ = setup
    gcfg = dataclasses.replace(GCFG, num_micro_batches=micro, remat=remat)
    mesh = grpo.make_mesh(*mesh_shape)
    base = grpo.place_params(jax.tree.map(jnp.copy, params), CFG, mesh)
    before = jax.tree.map(np.asarray, base)
    ad, opt = init_lora_state(jax.tree.map(jnp.copy, adapters), CFG, LCFG, gcfg, mesh)
    new, opt, metrics = make_lora_step(CFG, LCFG, gcfg, mesh, compiler_options=FAST)(ad, opt, batch, base)

    assert _max_diff(new, want_adapters) <= TOL
    assert _max_diff(new, adapters) > 1e-3  # the step did move the adapters
    for k, v in want.items():
        assert abs(float(metrics[k]) - float(v)) <= TOL, k
    assert 0 < float(metrics["clip_frac"]) < 0.5 and float(metrics["skipped"]) == 0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), base, before))
    shapes = {tuple(x.shape) for x in jax.tree.leaves(adapters)}
    moments = [x for x in jax.tree.leaves(opt) if x.ndim > 0]
    assert {tuple(x.shape) for x in moments} == shapes and len(moments) == 2 * len(jax.tree.leaves(adapters))
    specs = adapter_specs(CFG, LCFG, mesh)
    for leaf, spec in zip(jax.tree.leaves(new), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                          strict=True):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)


def test_adapter_layout_follows_the_rules_table():
    """a split along D over fsdp like its weight, b of o/down along D, the rank axis never split."""
    specs = adapter_specs(CFG, LCFG, grpo.make_mesh(2, 4))["layers"]
    assert specs["q"]["a"] == P(None, "fsdp", None) and specs["q"]["b"] == P(None, None, None)
    assert specs["o"]["a"] == P(None, None, None) and specs["o"]["b"] == P(None, None, "fsdp")
    assert specs["down"]["a"] == P(None, None, None) and specs["down"]["b"] == P(None, None, "fsdp")
    schema = lora_schema(CFG, LCFG)["layers"]
    n, h, d = CFG.num_heads, CFG.head_dim, CFG.embed_dim
    assert schema["q"]["a"].shape == (CFG.num_layers, d, 4) and schema["q"]["b"].shape == (CFG.num_layers, 4, n * h)
    assert schema["o"]["a"].shape == (CFG.num_layers, n * h, 4) and schema["o"]["b"].shape == (CFG.num_layers, 4, d)


def test_merge_reproduces_the_unmerged_model(setup):
    """Logits of merge(params, adapters) vs base + adapters unmerged: within 1e-4 (float32 rounding; the
    adapters move the logits by > 0.1, so a wrong scale, transpose or target would fail). On a mesh the merged
    leaves keep their weight's layout and the unadapted leaves are the input buffers."""
    params, adapters, batch, _, _, _ = setup
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
    fwd = jax.jit(model.forward, static_argnums=2, compiler_options=FAST)
    unmerged = fwd(with_adapters(params, adapters, LCFG), tokens, CFG, attention_mask=mask)
    merged = fwd(merge(params, adapters, CFG, LCFG), tokens, CFG, attention_mask=mask)
    base = fwd(params, tokens, CFG, attention_mask=mask)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 0.1
    assert float(jnp.max(jnp.abs(merged - unmerged))) <= 1e-4

    mesh = grpo.make_mesh(2, 4)
    placed = grpo.place_params(jax.tree.map(jnp.copy, params), CFG, mesh)
    ad, _ = init_lora_state(jax.tree.map(jnp.copy, adapters), CFG, LCFG, GCFG, mesh)
    out = merge(placed, ad, CFG, LCFG)
    for name in ("q", "o", "down"):
        w = placed["layers"][name]
        assert out["layers"][name].sharding.is_equivalent_to(w.sharding, w.ndim)
    assert out["embed"] is placed["embed"] and out["layers"]["attn_norm"] is placed["layers"]["attn_norm"]


@pytest.mark.parametrize("lora_cfg, message", [
    (LoraConfig(rank=-1), "--lora_rank must be >= 0"),
    (LoraConfig(rank=33), "--lora_rank 33 exceeds the smallest dimension of the targeted weights of tiny-gemma2 (32)"),
    (LoraConfig(rank=4, targets=("q", "mlp")), "--lora_targets: unknown target"),
    (LoraConfig(rank=4, targets=("q", "q")), "--lora_targets: a target is listed twice"),
    (LoraConfig(rank=4, targets=()), "--lora_targets is empty"),
    (LoraConfig(rank=4, alpha=0.0), "--lora_alpha must be > 0"),
])
def test_validate_lora_errors(lora_cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        validate_lora(lora_cfg, CFG)
    assert "\n" not in str(e.value)


def test_validate_lora_accepts_good_settings():
    """Rank 0 (full fine-tuning), the smallest dimension itself (k/v: K*H = 32), and a subset of targets."""
    validate_lora(LoraConfig(rank=0), CFG)
    validate_lora(LoraConfig(rank=32), CFG)
    validate_lora(LoraConfig(rank=64, targets=("q", "o", "gate", "up", "down")), CFG)
    assert LoraConfig(rank=16).scale == 2.0 and LoraConfig(rank=16, alpha=16).scale == 1.0
    assert hash(LoraConfig(4, targets=["q"])) == hash(LoraConfig(4, 8.0, ("q",)))  # a usable static jit arg
