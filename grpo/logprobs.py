"""Per-token log-probabilities log p(tokens[:, t] | tokens[:, :t]) in float32, without a [B, T, V] tensor.

For Gemma V = 256k-262k, so full-batch logits are 1 GiB per 1k tokens per row in float32. We compute
the final hidden states [B, T, D], then scan over CHUNKS OF T: each chunk makes its [B, c, V] logits
(tied unembedding + Gemma 2 final soft-cap + temperature), log-softmax, gathers the target token and
the entropy, and drops the logits. The chunk body is `jax.checkpoint`ed, so the backward pass
recomputes one chunk's logits at a time instead of saving them: peak logits memory is [B, c, V].

Position 0 has no context and gets logprob 0 (and entropy 0). With `tail=N` only the last N positions get
log-probs (the rest 0): the training batch puts every completion token there, and for a 262k vocabulary the
unembedding is most of the step's FLOPs, so skipping the prompt positions saves about a third of the step.

Entry points: `logprobs` (one device, jitted) and `make_policy_logprobs` (the same on the (data, fsdp) mesh
under shard_map, for any fine-tuning mode: fn(frozen, trained, tokens, mask), grpo/policy.py), with the step's
settings from a GRPOConfig via `step_settings`: the old-policy and reference passes of the training loop.
`make_sharded_logprobs` is the plain-params form (params, tokens, mask). The passes cast the weights to the
step's compute dtype and run its micro-batch shapes through the same `sharded_token_logprobs` (the FSDP forward
pass of grpo/fsdp_forward.py, then the chunked log-softmax above): at the first iteration the ratio is exactly 1
and at step 0 the KL exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grpo import sharding
from grpo.config import GRPOConfig
from grpo.fsdp_forward import check_rows, fsdp_hidden_states, pad_columns
from grpo.policy import FullPolicy, LoraPolicy, Policy
from model.config import GemmaConfig
from model.forward import hidden_states
from model.forward import unembed as model_unembed
from model.lora import LoraConfig

DEFAULT_CHUNK = 256
# Cap on the logits one chunk holds, in elements (64M floats = 256 MiB): with V = 262k and 16 rows a chunk of
# 256 tokens would be 4.3 GB per copy, and softmax makes several. The chunk shrinks to fit.
LOGITS_BUDGET = 64 * 2**20


def token_logprobs(
    h: jax.Array, embed: jax.Array, tokens: jax.Array, model_cfg: GemmaConfig, *, chunk: int = DEFAULT_CHUNK,
    temperature: float = 1.0, tail: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """From final hidden states h [B, T, D]: (logprobs [B, T], entropy [B, T]) float32, chunked over T.

    tail: compute only the last `tail` positions (others get 0); None: every position after the first.
    """
    layout = ChunkLayout.of(h.shape, embed.shape[0], chunk, tail)
    hs, targets = layout.split(h, tokens)

    @jax.checkpoint
    def one_chunk(hc, tc):
        logits, logz, lp, probs = chunk_logprobs(hc, tc, embed, model_cfg, temperature)
        z, p = jax.lax.stop_gradient((logits, probs))  # entropy is a metric: no backward through it
        ent = jax.lax.stop_gradient(logz) - jnp.sum(p * z, axis=-1)
        return lp, ent

    with jax.named_scope("logprobs"):
        _, (lp, ent) = jax.lax.scan(lambda _, xs: (None, one_chunk(*xs)), None, (hs, targets))
    return layout.join(lp), layout.join(ent)


def chunk_logprobs(hc, tc, embed, model_cfg: GemmaConfig, temperature: float):
    """One chunk's (logits [B, c, V] float32 at the temperature, logz [B, c], log-prob of tc [B, c], softmax
    [B, c, V]). The one definition of a log-prob, shared by every pass, so all of them compute the same numbers.

    logz is jax.nn.logsumexp written out so that its exponentials are also the softmax: one exp per logit, not
    two (callers that only need lp never materialise the softmax)."""
    logits = model_unembed({"embed": embed}, hc, model_cfg) / temperature  # [B, c, V] float32
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [B, c, 1]
    e = jnp.exp(logits - top)  # [B, c, V]
    total = jnp.sum(e, axis=-1, keepdims=True)  # [B, c, 1]
    logz = (top + jnp.log(total))[..., 0]  # [B, c]
    lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - logz
    return logits, logz, lp, e / total


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How [B, T] positions are cut into chunks: positions start..T-1 get log-probs (position t is predicted by
    h at t - 1), in n_chunks chunks of c (the last padded), each chunk's logits [B, c, V] within LOGITS_BUDGET."""

    rows: int
    length: int
    start: int
    c: int

    @staticmethod
    def of(h_shape, vocab: int, chunk: int, tail: int | None) -> ChunkLayout:
        b, t = h_shape[0], h_shape[1]
        start = tail_start(t, tail)  # first position that gets a log-prob
        c = max(1, min(chunk, t - start, LOGITS_BUDGET // (b * vocab)))
        return ChunkLayout(b, t, start, c)

    @property
    def pad(self) -> int:
        return (-(self.length - self.start)) % self.c

    def split(self, h: jax.Array, *per_token: jax.Array) -> tuple[jax.Array, ...]:
        """h [B, T, D] -> [C, B, c, D] (the states that predict positions start..T-1), then each [B, T] array
        (tokens, weights, ...) -> [C, B, c] at the positions they score."""
        d = h.shape[-1]
        hs = jnp.pad(h[:, self.start - 1 : -1], ((0, 0), (0, self.pad), (0, 0)))  # [B, n + pad, D]
        hs = hs.reshape(self.rows, -1, self.c, d).swapaxes(0, 1)  # [C, B, c, D]
        return (hs, *(self.cut(x) for x in per_token))

    def cut(self, x: jax.Array) -> jax.Array:
        """[B, T] -> [C, B, c]: the positions start..T-1, padded to whole chunks."""
        x = jnp.pad(x[:, self.start :], ((0, 0), (0, self.pad)))
        return x.reshape(self.rows, -1, self.c).swapaxes(0, 1)

    def join(self, x: jax.Array) -> jax.Array:
        """[C, B, c] per-chunk values -> [B, T] float32, 0 before `start`."""
        n = self.length - self.start
        first = jnp.zeros((self.rows, self.start), x.dtype)
        return jnp.concatenate([first, x.swapaxes(0, 1).reshape(self.rows, -1)[:, :n]], axis=1)


def tail_start(length: int, tail: int | None) -> int:
    """The first position with a log-prob: 1 (position 0 has no context), or length - tail."""
    return 1 if tail is None else max(1, length - tail)


@functools.partial(jax.jit, static_argnames=("model_cfg", "chunk", "temperature", "tail"))
def logprobs(
    params: dict, tokens: jax.Array, attention_mask: jax.Array, model_cfg: GemmaConfig, *, chunk: int = DEFAULT_CHUNK,
    temperature: float = 1.0, tail: int | None = None,
) -> jax.Array:
    """[B, T] float32: logprob of tokens[:, t] given tokens[:, :t] under `params` (position 0 gets 0)."""
    _check_tokens(tokens, attention_mask)
    h = hidden_states(params, tokens, model_cfg, attention_mask=attention_mask)
    return token_logprobs(h, params["embed"], tokens, model_cfg, chunk=chunk, temperature=temperature, tail=tail)[0]


def sharded_token_logprobs(
    local: dict, tokens: jax.Array, attention_mask: jax.Array, model_cfg: GemmaConfig, specs: dict, *,
    chunk: int = DEFAULT_CHUNK, temperature: float = 1.0, tail: int | None = None, remat: bool = False,
    group: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: (logprobs, entropy) [b, T] of this device's rows under the local weight shards.

    The one definition shared by the training step's loss and the old / reference log-prob passes, so for
    the same weights, rows and settings they compute the same numbers (the ratio is 1, the KL 0, exactly).
    group > 1: the rows are GRPO groups of that many rows sharing the columns before the tail, each group's
    prompt run once (model/shared_prompt.py) when the rows are whole groups.
    """
    h, col = fsdp_hidden_states(local, tokens, attention_mask, model_cfg, specs, remat=remat, group=group, tail=tail)
    embed = sharding.gather(local["embed"], specs["embed"])  # [V, D], only for the chunked unembedding
    lp, ent = token_logprobs(h, embed, tokens[:, col:], model_cfg, chunk=chunk, temperature=temperature, tail=tail)
    return pad_columns(lp, col), pad_columns(ent, col)


def cast_params(params: dict, dtype: str | None) -> dict:
    """The weights a forward pass computes with: every leaf cast to `dtype` (None: as stored). Gradients flow
    back through the cast, so float32 master weights train with bf16 compute."""
    if dtype is None:
        return params
    return jax.tree.map(lambda w: w.astype(dtype), params)


def make_policy_logprobs(
    policy: Policy, mesh: Mesh, *, chunk: int = DEFAULT_CHUNK, temperature: float = 1.0, tail: int | None = None,
    compute_dtype: str | None = None, num_micro_batches: int = 1, group: int = 1, compiler_options: dict | None = None,
):
    """Jitted fn(frozen, trained, tokens, attention_mask) -> [B, T] float32 logprobs on the mesh under
    policy.weights(frozen, trained), in any fine-tuning mode (grpo/policy.py).

    frozen and trained laid out as the policy says; rows split over (data, fsdp); output the same way.
    compute_dtype and num_micro_batches: as the training step uses them (weights cast, each device's rows in
    M pieces), so old and reference log-probs are bit-identical to the step's own (`step_settings` reads all of
    these from a GRPOConfig). group > 1: rows come in GRPO groups of that many sharing their columns before the
    tail, and each group's prompt is run once (see sharded_token_logprobs).
    """
    return jax.jit(_sharded_logprobs(policy, mesh, chunk, temperature, tail, compute_dtype, num_micro_batches, group),
                   compiler_options=compiler_options)


def _sharded_logprobs(policy: Policy, mesh: Mesh, chunk, temperature, tail, compute_dtype, num_micro_batches, group):
    """make_policy_logprobs's function, unjitted."""
    weight_specs = policy.weight_specs(mesh)
    rows = sharding.batch_spec(2)

    def body(frozen, trained, tokens, attention_mask):
        w = cast_params(policy.weights(frozen, trained), compute_dtype)
        split = lambda x: x.reshape(num_micro_batches, -1, x.shape[1])  # [M, b / M, T]
        one = lambda mb: sharded_token_logprobs(w, *mb, policy.model_cfg, weight_specs, chunk=chunk,
                                                temperature=temperature, tail=tail, group=group)[0]
        return jax.lax.map(one, (split(tokens), split(attention_mask))).reshape(tokens.shape)

    # in: frozen and trained per the rules table, tokens and mask split by rows; out: logprobs split by rows.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(policy.frozen_specs(mesh), policy.trained_specs(mesh), rows,
                                                      rows), out_specs=rows, check_vma=True)

    def run(frozen, trained, tokens, attention_mask):
        _check_tokens(tokens, attention_mask)
        check_rows(tokens.shape[0], mesh, num_micro_batches, "log-prob pass")
        return mapped(frozen, trained, tokens, attention_mask.astype(jnp.int32))

    return run


def make_sharded_logprobs(
    model_cfg: GemmaConfig, mesh: Mesh, *, chunk: int = DEFAULT_CHUNK, temperature: float = 1.0,
    tail: int | None = None, compute_dtype: str | None = None, num_micro_batches: int = 1,
    compiler_options: dict | None = None, group: int = 1,
):
    """Jitted fn(params, tokens, attention_mask) -> [B, T] float32 logprobs of plain params on the mesh: the full
    fine-tuning policy's make_policy_logprobs with its empty frozen tree left out (same settings)."""
    run = _sharded_logprobs(FullPolicy(model_cfg), mesh, chunk, temperature, tail, compute_dtype, num_micro_batches,
                            group)
    return jax.jit(functools.partial(run, {}), compiler_options=compiler_options)


def step_settings(grpo_cfg: GRPOConfig) -> dict:
    """make_policy_logprobs's settings as the training step computes log-probs (chunk, temperature, tail, compute
    dtype, micro-batches, shared prompts): the old- and reference-policy passes of the training loop."""
    return {"chunk": grpo_cfg.logits_chunk, "temperature": grpo_cfg.temperature, "tail": grpo_cfg.logprob_tail,
            "compute_dtype": grpo_cfg.compute_dtype, "num_micro_batches": grpo_cfg.num_micro_batches,
            "group": sharing_group(grpo_cfg)}


def make_step_logprobs(
    model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *, lora_cfg: LoraConfig | None = None,
    compiler_options: dict | None = None,
):
    """The step's log-prob pass in the argument orders from before the policy interface (tests):
    fn(params, tokens, mask), or with LoRA fn(base, adapters, tokens, mask), which is the LoRA policy's
    (frozen, trained) order. New code: make_policy_logprobs(policy, mesh, **step_settings(grpo_cfg))."""
    if lora_cfg is None or lora_cfg.rank == 0:
        return make_sharded_logprobs(model_cfg, mesh, **step_settings(grpo_cfg), compiler_options=compiler_options)
    return make_policy_logprobs(LoraPolicy(model_cfg, lora_cfg), mesh, **step_settings(grpo_cfg),
                                compiler_options=compiler_options)


def sharing_group(grpo_cfg: GRPOConfig) -> int:
    """The row-group size whose prompts the step's passes run once: num_generations with shared_prompt, else 1."""
    return grpo_cfg.num_generations if grpo_cfg.shared_prompt else 1


def _check_tokens(tokens, attention_mask) -> None:
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2, got shape {tokens.shape}")
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
