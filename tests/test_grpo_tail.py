"""logprob_tail: computing log-probs only for the last N positions changes nothing when completions lie there.

Reference: the same loss and gradient with logprob_tail=None (every position); tolerance 1e-6 (float32).
"""

import jax
import jax.numpy as jnp
import numpy as np

import grpo
import model


def _batch(b=4, prompt=9, completion=5, seed=0):
    rng = np.random.default_rng(seed)
    t = prompt + completion
    tokens = rng.integers(4, 256, (b, t)).astype(np.int32)
    attention = np.ones((b, t), np.int32)
    attention[:, :3] = 0  # left padding in the prompt part
    comp = np.zeros((b, t), np.int32)
    comp[:, prompt : prompt + 3] = 1  # completions of 3 tokens, right-padded within the tail
    attention[:, prompt + 3 :] = 0
    return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention),
            "completion_mask": jnp.asarray(comp), "advantages": jnp.asarray(rng.normal(size=b), jnp.float32),
            "old_logprobs": jnp.asarray(rng.normal(size=(b, t)) * 0.1 - 3.0, jnp.float32)}


def test_tail_matches_full_loss_and_grad():
    cfg = model.tiny_config("gemma2", num_layers=2)
    params = model.init_params(jax.random.key(0), cfg)
    batch = _batch()
    full = grpo.GRPOConfig(num_generations=2)
    tail = grpo.GRPOConfig(num_generations=2, logprob_tail=5)

    def loss(p, c):
        return grpo.grpo_loss(p, batch, cfg, c)[0]

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l_full, g_full), (l_tail, g_tail) = (vg(params, c) for c in (full, tail))
    np.testing.assert_allclose(l_tail, l_full, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_tail, g_full)


def test_tail_logprobs_zero_before_and_equal_inside():
    cfg = model.tiny_config("gemma3", num_layers=2)
    params = model.init_params(jax.random.key(1), cfg)
    batch = _batch(seed=1)
    full = grpo.logprobs(params, batch["tokens"], batch["attention_mask"], cfg)
    tail = grpo.logprobs(params, batch["tokens"], batch["attention_mask"], cfg, tail=5)
    np.testing.assert_allclose(tail[:, -5:], full[:, -5:], atol=1e-6)
    assert np.all(np.asarray(tail[:, :-5]) == 0)
