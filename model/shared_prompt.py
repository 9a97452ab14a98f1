"""The forward pass over a GRPO batch with each group's prompt computed ONCE, not G times.

A GRPO batch is P groups of G rows; the G rows of a group share their prompt (left-padded into the same Tp
columns, same tokens, same mask) and differ only in the completion after it (Tc = T - Tp columns). A causal
model's prompt states do not depend on what follows, so running the prompt once per group and letting each
completion attend to that one copy gives the same hidden states (exactly in real arithmetic; in floats up to
the matmuls' summation order) for (P + P*G*Tc/Tp) / (P*G) of the layer work, and the activations saved for
the backward pass shrink with it (BUILD.md "Training-step speed" measures it). The gradient of a shared
prompt state is the sum over the group's G completions, which autodiff makes from the broadcast below.

Packed layout (`pack`): the stream is ONE row [1, N, ...], N = P*Tp + B*Tc, holding the P prompts (group 0's
prompt, group 1's, ...) then the B completions, so every per-token op (norms, projections, MLP) runs as one
matmul over all N tokens. Only attention sees the structure (`shared_prompt_layer`): prompt queries attend to
their own prompt (causal), completion queries to [their group's prompt keys ; their own completion keys],
masked by positions exactly as `model.forward.attend` does for a whole row (sliding windows included).

Who uses it: the training step's loss and the old / reference log-prob passes (grpo/logprobs.py), when
GRPOConfig.shared_prompt is on and each device's micro-batch holds whole groups. The caller guarantees that
the rows of a group really share their first Tp columns (grpo/trainer.py checks the batches it builds);
only the first row's prompt is read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.config import GemmaConfig
from model.forward import attend, attention_inputs, layer_output


@dataclasses.dataclass(frozen=True)
class PromptSharing:
    """Static shape of a packed batch: `rows` rows in groups of `group`, the first `prompt_len` columns shared."""

    rows: int  # B rows of the (micro-)batch
    group: int  # G consecutive rows per prompt
    prompt_len: int  # Tp shared columns; the completion is the remaining T - Tp

    @property
    def groups(self) -> int:
        return self.rows // self.group

    @property
    def prompt_tokens(self) -> int:
        """How many of the packed stream's tokens are prompt tokens (the rest are completion tokens)."""
        return self.groups * self.prompt_len


def prompt_sharing(rows: int, length: int, group: int, tail: int | None) -> PromptSharing | None:
    """The packing for [rows, length] tokens whose last `tail` columns are the completions, or None when it does
    not apply: no tail (no prompt/completion split), nothing before it, G = 1, or rows not whole groups."""
    if tail is None or tail >= length or group < 2 or rows % group:
        return None
    return PromptSharing(rows, group, length - tail)


def pack(x: jax.Array, s: PromptSharing) -> jax.Array:
    """[B, T, ...] per-row values -> [1, N, ...]: each group's prompt columns once (from its first row), then
    every row's completion columns."""
    prompts = x[:: s.group, : s.prompt_len]  # [P, Tp, ...]
    completions = x[:, s.prompt_len :]  # [B, Tc, ...]
    flat = lambda a: a.reshape(1, -1, *a.shape[2:])
    return jnp.concatenate([flat(prompts), flat(completions)], axis=1)


def split(x: jax.Array, s: PromptSharing) -> tuple[jax.Array, jax.Array]:
    """A packed [1, N, ...] -> (prompts [P, Tp, ...], completions [B, Tc, ...])."""
    n = s.prompt_tokens
    return x[0, :n].reshape(s.groups, s.prompt_len, *x.shape[2:]), x[0, n:].reshape(s.rows, -1, *x.shape[2:])


def with_prompt(prompt_part: jax.Array, completion_part: jax.Array, s: PromptSharing) -> jax.Array:
    """Group prompts [P, p, ...] and completions [B, c, ...] -> [B, p + c, ...]: each row with its group's prompt
    in front (a broadcast: in the backward pass the G rows' gradients are summed into the one prompt)."""
    return jnp.concatenate([jnp.repeat(prompt_part, s.group, axis=0), completion_part], axis=1)


def tail_states(h: jax.Array, s: PromptSharing) -> jax.Array:
    """Packed final states [1, N, D] -> [B, 1 + Tc, D], the states at columns Tp - 1 .. T - 1 of every row: the
    last prompt state (it predicts the first completion token) then the completion's."""
    prompts, completions = split(h, s)
    return with_prompt(prompts[:, -1:], completions, s)


def shared_prompt_layer(lp, x, c, positions, valid, cfg: GemmaConfig, *, sharing: PromptSharing):
    """`model.forward.decoder_layer` over a packed stream: x [1, N, D], positions / valid [1, N].

    Returns (output [1, N, D], (k, v) [1, N, K, H]) like decoder_layer. The per-token work runs on the N packed
    tokens; attention runs per group for the prompts and per row for the completions, over the same keys and
    the same position mask as the unpacked row would see.
    """
    with jax.named_scope("attention"):
        q, k, v = attention_inputs(lp, x, c, positions, cfg)  # [1, N, n, H], [1, N, K, H] x 2
        (qp, qc), (kp, kc), (vp, vc) = split(q, sharing), split(k, sharing), split(v, sharing)
        (pos_p, pos_c), (valid_p, valid_c) = split(positions, sharing), split(valid, sharing)
        with jax.named_scope("prompts"):  # [P, Tp, n, H]
            attn_p = attend(qp, kp, vp, pos_p, pos_p, valid_p, c["window"], cfg)
        with jax.named_scope("completions"):  # [B, Tc, n, H] over the Tp + Tc keys of the row
            keys = lambda prompt_part, completion_part: with_prompt(prompt_part, completion_part, sharing)
            attn_c = attend(qc, keys(kp, kc), keys(vp, vc), pos_c, keys(pos_p, pos_c), keys(valid_p, valid_c),
                            c["window"], cfg)
        flat = lambda a: a.reshape(1, -1, *a.shape[2:])
        attn = jnp.concatenate([flat(attn_p), flat(attn_c)], axis=1)  # [1, N, n, H]
    return layer_output(lp, x, attn, cfg), (k, v)
