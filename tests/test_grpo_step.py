"""The sharded GRPO step against plain single-device math, on 8 fake CPU devices (tests/conftest.py).

Reference: `_reference_update` below, written without the mesh or the chunked logprobs: full
model.forward logits, log_softmax, the GRPO loss pieces, jax.grad, optax.clip_by_global_norm and the
same AdamW. Tolerance: 1e-5 max abs on new params and metrics (float32, "highest" matmul precision).
AdamW uses adam_eps=1.0 here: with the default 1e-8 the first Adam update is ~lr * sign(g), which hides
the gradient's scale (a doubled gradient would pass) and flips on gradients near 1e-8 (noise). With
eps=1 the update is ~lr * g, so the params comparison checks the gradient itself.
Compiles use XLA optimization level 0: same math, ~3x faster to compile on 2 cores.
"""

import dataclasses

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
from grpo.policy import make_optimizer

FAST = {"xla_backend_optimization_level": 0}


def _init(cfg, seed: int) -> dict:
    """model.init_params under one jit: the same weights, without ~10 s of op-by-op dispatch."""
    return jax.jit(model.init_params, static_argnums=1, compiler_options=FAST)(jax.random.key(seed), cfg)
TOL = 1e-5
B, T, PROMPT = 32, 16, 6
CFG = model.tiny_config("gemma2")
GCFG = grpo.GRPOConfig(beta=0.04, epsilon_high=0.28, learning_rate=0.1, adam_eps=1.0, weight_decay=0.1,
                       max_grad_norm=1.0, logits_chunk=4)


def _batch(params, rng) -> tuple[dict, np.ndarray]:
    """Left-padded prompts, right-padded completions of different lengths, ratios off 1 so the clip engages.

    Also returns the current policy's logprobs [B, T]."""
    tokens, attention, completion = ragged_rows(rng, CFG.vocab_size, B, T, PROMPT, right_pad_mod=5)
    lp = np.asarray(grpo.logprobs(params, jnp.asarray(tokens), jnp.asarray(attention), CFG))
    batch = dict(tokens=tokens, attention_mask=attention, completion_mask=completion,
                 advantages=rng.normal(size=B).astype(np.float32),
                 old_logprobs=(lp + 0.3 * rng.normal(size=(B, T))).astype(np.float32),
                 ref_logprobs=(lp + 0.1 * rng.normal(size=(B, T))).astype(np.float32))
    return batch, lp


def _reference_update(params, batch, gcfg):
    def loss_fn(p):
        logits = model.forward(p, batch["tokens"], CFG, attention_mask=batch["attention_mask"])  # [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        lp = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        lp = jnp.pad(lp, ((0, 0), (1, 0)))
        mask = batch["completion_mask"] * batch["attention_mask"]
        t = grpo.per_token_loss(lp, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"], gcfg)
        return grpo.aggregate(t["loss"], mask, gcfg, mask.sum(), B), t

    @jax.jit
    def update(params, batch):
        (loss, t), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        tx = optax.chain(optax.clip_by_global_norm(gcfg.max_grad_norm), make_optimizer(gcfg, CFG))
        updates, _ = tx.update(grads, tx.init(params), params)
        mask = batch["completion_mask"] * batch["attention_mask"]
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "kl": (t["kl"] * mask).sum() / mask.sum(),
                   "clip_frac": (t["clipped"] * mask).sum() / mask.sum(), "num_completion_tokens": mask.sum()}
        return optax.apply_updates(params, updates), metrics

    return update(params, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def setup():
    params = _init(CFG, 0)
    batch, lp = _batch(params, np.random.default_rng(0))
    want_params, want_metrics = _reference_update(params, batch, GCFG)
    return params, batch, want_params, want_metrics, lp


def _check_against_reference(new_params, metrics, params, want_params, want) -> None:
    assert _max_diff(new_params, want_params) <= TOL
    assert _max_diff(new_params, params) > 1e-3  # the step did move the params
    for k, v in want.items():
        assert abs(float(metrics[k]) - float(v)) <= TOL, k
    assert 0 < float(metrics["clip_frac"]) < 0.5 and float(metrics["skipped"]) == 0
    assert float(metrics["learning_rate"]) == pytest.approx(GCFG.learning_rate)


def _run_step(params, batch, mesh_shape, gcfg):
    mesh = grpo.make_mesh(*mesh_shape)
    p, o = grpo.init_train_state(jax.tree.map(jnp.copy, params), CFG, gcfg, mesh)  # a copy: the step donates
    return grpo.make_step(CFG, gcfg, mesh, compiler_options=FAST)(p, o, batch)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.mark.parametrize("mesh_shape, micro, remat", [((8, 1), 1, False), ((1, 8), 2, False), ((2, 4), 4, True)])
def test_sharded_step_equals_single_device(setup, mesh_shape, micro, remat):
    """Each mesh shape, and 1, 2 and 4 micro-batches (with and without remat), give the reference update.

    Mesh (2, 4) with one micro-batch is checked in test_compiles_once_... below (one compile fewer)."""
    params, batch, want_params, want, _ = setup
    gcfg = dataclasses.replace(GCFG, num_micro_batches=micro, remat=remat)
    new_params, _, metrics = _run_step(params, batch, mesh_shape, gcfg)
    _check_against_reference(new_params, metrics, params, want_params, want)


@pytest.mark.parametrize("loss_type", ["sequence_mean", "dr_grpo"])
def test_other_loss_types_over_micro_batches_equal_single_device(setup, loss_type):
    """sequence_mean divides each row by ITS token count, then by the global row count; dr_grpo by rows x the
    budget: a micro-batch that normalised by its own rows or tokens would differ from the full-batch reference."""
    params, batch, _, _, _ = setup
    gcfg = dataclasses.replace(GCFG, loss_type=loss_type, num_micro_batches=2, max_completion_length=T)
    want_params, want = _reference_update(params, batch, gcfg)
    new_params, _, metrics = _run_step(params, batch, (2, 4), gcfg)
    _check_against_reference(new_params, metrics, params, want_params, want)


def test_compiles_once_keeps_layout_and_skips_nonfinite_steps(setup, monkeypatch):
    """Traces counted through grpo.loss.policy_loss (called once per trace of the step body)."""
    params, batch, want_params, want, _ = setup
    traces = []
    real = grpo.loss.policy_loss
    monkeypatch.setattr(grpo.loss, "policy_loss", lambda *a, **k: (traces.append(1), real(*a, **k))[1])
    mesh = grpo.make_mesh(2, 4)
    step = grpo.make_step(CFG, GCFG, mesh, compiler_options=FAST)
    p, o = grpo.init_train_state(jax.tree.map(jnp.copy, params), CFG, GCFG, mesh)
    p, o, m1 = step(p, o, batch)
    _check_against_reference(p, m1, params, want_params, want)
    first = len(traces)
    p, o, m2 = step(p, o, {**batch, "advantages": -batch["advantages"]})
    assert first >= 1 and len(traces) == first, "a second step with the same shapes must not retrace"
    assert float(m1["skipped"]) == float(m2["skipped"]) == 0

    specs = grpo.param_specs(CFG, mesh)
    assert specs["layers"]["q"] == P(None, "fsdp", None, None) and specs["final_norm"] == P(None)
    assert p["layers"]["q"].sharding.is_equivalent_to(NamedSharding(mesh, specs["layers"]["q"]), 4)
    assert p["embed"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)
    mu = o.inner_state[0].mu  # AdamW's first moment: laid out exactly like the params
    assert mu["layers"]["down"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "fsdp")), 3)
    assert o.count.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)

    before = jax.tree.map(np.asarray, (p, o))
    nan_adv = batch["advantages"].copy()
    nan_adv[3] = np.nan
    p, o, m3 = step(p, o, {**batch, "advantages": nan_adv})
    assert float(m3["skipped"]) == 1 and not np.isfinite(float(m3["loss"]))
    assert _max_diff(jax.tree.map(np.asarray, (p, o)), before) == 0  # nothing applied, step count unchanged
    assert len(traces) == first


def test_bf16_compute_with_float32_master_weights(setup):
    """compute_dtype="bfloat16": float32 params and Adam state, bf16 forward/backward. bf16 keeps 8 mantissa
    bits (~4e-3 relative per op), so against the float32 reference: loss and grad norm within 3% and the
    whole update within 5% in L2 (measured: 0.9%, 0.02%, 1.5%); params and Adam state stay float32."""
    params, batch, want_params, want, _ = setup
    gcfg = dataclasses.replace(GCFG, compute_dtype="bfloat16")
    new_params, opt_state, metrics = _run_step(params, batch, (2, 4), gcfg)
    assert new_params["embed"].dtype == jnp.float32 and opt_state.inner_state[0].mu["embed"].dtype == jnp.float32
    assert float(metrics["loss"]) == pytest.approx(float(want["loss"]), rel=3e-2)
    assert float(metrics["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=3e-2)
    norm = lambda a, b: float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))
    assert norm(new_params, want_params) <= 0.05 * norm(want_params, params)


def test_beta_zero_without_old_or_ref_logprobs(setup):
    """beta == 0, no ref and no old logprobs: ratio == 1, so pg_loss == -token-mean of the advantages (hand
    formula, 1e-6), and kl is absent rather than nan."""
    params, batch, _, _, _ = setup
    gcfg = grpo.GRPOConfig(learning_rate=1e-2)
    lean = {k: v for k, v in batch.items() if k not in ("old_logprobs", "ref_logprobs")}
    _, _, metrics = _run_step(params, lean, (2, 4), gcfg)
    mask = batch["completion_mask"] * batch["attention_mask"]
    want = -(batch["advantages"][:, None] * mask).sum() / mask.sum()
    assert "kl" not in metrics
    assert float(metrics["loss"]) == pytest.approx(want, abs=1e-6)
    assert float(metrics["clip_frac"]) == 0.0 and np.isfinite(float(metrics["grad_norm"]))


def test_bad_batch_is_a_clear_error(setup):
    params, batch, _, _, _ = setup
    mesh = grpo.make_mesh(2, 4)
    step = grpo.make_step(CFG, GCFG, mesh)
    p, o = grpo.init_train_state(jax.tree.map(jnp.copy, params), CFG, GCFG, mesh)
    with pytest.raises(ValueError, match="needs batch\\['ref_logprobs'\\]"):
        step(p, o, {k: v for k, v in batch.items() if k != "ref_logprobs"})
    with pytest.raises(ValueError, match="divisible by devices x micro-batches = 8"):
        step(p, o, {k: v[:12] for k, v in batch.items()})
    with pytest.raises(ValueError, match="unexpected \\['rewards'\\]"):
        step(p, o, {**batch, "rewards": batch["advantages"]})
    narrow = model.abstract_params(model.tiny_config("gemma2", embed_dim=32))
    with pytest.raises(ValueError, match="wrong shapes"):
        grpo.init_train_state(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), narrow), CFG, GCFG, mesh)


def test_loss_gradient_matches_finite_differences(setup):
    """Directional derivatives of grpo.grpo_loss (the one-device loss) against central differences.

    Directions have unit norm, eps = 3e-2, float32. x64 would not help: the model computes norms, RoPE and
    logits in float32 on purpose, so the loss carries ~1e-6 absolute rounding noise, i.e. ~2e-5 on the
    difference quotient; truncation error is ~1e-4 relative. Tolerance 1e-2 relative + 1e-5 absolute
    (derivatives here are 4e-4 .. 5e-2): a dropped KL term, a wrong sign or a missing stop_gradient
    changes them by far more.
    """
    params, full, _, _, lp = setup
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(2, B, T))
    batch = {**full, "old_logprobs": lp + 0.05 * noise[0], "ref_logprobs": lp + 0.1 * noise[1]}
    cfg, gcfg = CFG, grpo.GRPOConfig(beta=0.1, loss_type="sequence_mean", logits_chunk=5)
    loss = jax.jit(lambda p: grpo.grpo_loss(p, batch, cfg, gcfg)[0], compiler_options=FAST)
    grads = jax.jit(jax.grad(lambda p: grpo.grpo_loss(p, batch, cfg, gcfg)[0]), compiler_options=FAST)(params)
    eps = 3e-2
    for only in (None, "embed", "q", "down", "attn_norm", "final_norm"):
        d = _direction(params, only, rng)
        analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True))
        plus, minus = (float(loss(jax.tree.map(lambda p, v, s=s: p + s * v, params, d))) for s in (eps, -eps))
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-2 * abs(analytic) + 1e-5, (only, analytic, numeric)


def _direction(params, only, rng):
    """A random unit-norm direction over every leaf (only=None) or over the leaves named `only`."""
    def one(path, x):
        on = only is None or path[-1].key == only
        return jnp.asarray(rng.normal(size=x.shape) * on, x.dtype)

    d = jax.tree_util.tree_map_with_path(one, params)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(d)))
    return jax.tree.map(lambda v: v / norm, d)
