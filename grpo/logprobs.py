"""Per-token log-probabilities log p(tokens[:, t] | tokens[:, :t]) in float32, without a [B, T, V] tensor.

For Gemma V = 256k-262k, so full-batch logits are 1 GiB per 1k tokens per row in float32. We compute
the final hidden states [B, T, D], then scan over CHUNKS OF T: each chunk makes its [B, c, V] logits
(tied unembedding + Gemma 2 final soft-cap + temperature), log-softmax, gathers the target token and
the entropy, and drops the logits. The chunk body is `jax.checkpoint`ed, so the backward pass
recomputes one chunk's logits at a time instead of saving them: peak logits memory is [B, c, V].

Position 0 has no context and gets logprob 0 (and entropy 0). With `tail=N` only the last N positions get
log-probs (the rest 0): the training batch puts every completion token there, and for a 262k vocabulary the
unembedding is most of the step's FLOPs, so skipping the prompt positions saves about a third of the step.

Entry points: `logprobs` (one device, jitted) and `make_sharded_logprobs` / `make_step_logprobs` (the same on
the (data, fsdp) mesh under shard_map, for the old-policy and reference passes of the training loop; with
LoRA the old policy is base + adapters, the reference the base params alone, so no second model is kept).
The passes cast the weights to the step's compute dtype and run its micro-batch shapes through the same
`sharded_token_logprobs`: at the first iteration the ratio is exactly 1 and at step 0 the KL exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from grpo import sharding
from grpo.config import GRPOConfig
from model.config import GemmaConfig
from model.forward import default_positions, embed_tokens, hidden_states, rms_norm, scan_layers
from model.forward import unembed as model_unembed
from model.lora import LoraConfig, attach, with_adapters
from model.shared_prompt import pack, prompt_sharing, shared_prompt_layer, tail_states

DEFAULT_CHUNK = 256
# Cap on the logits one chunk holds, in elements (64M floats = 256 MiB): with V = 262k and 16 rows a chunk of
# 256 tokens would be 4.3 GB per copy, and softmax makes several. The chunk shrinks to fit.
LOGITS_BUDGET = 64 * 2**20
# checkpoint_name of all-gathered weights: never saved for the backward pass, always re-gathered.
GATHERED = "fsdp_gathered"


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


def embed_lookup(local_embed: jax.Array, tokens: jax.Array, spec, model_cfg: GemmaConfig) -> jax.Array:
    """Inside shard_map: model.embed_tokens for this device's rows [b, T] -> [b, T, D], from the local shard.

    With the vocab rows split over an axis of f devices, each device looks up the tokens of all f peers in
    ITS rows (zeros for tokens it does not hold) and a psum_scatter hands every device the sum for its
    own tokens. Traffic is f * b * T * D activations, not the [V, D] table, and the backward pass
    scatters straight into the local rows (no full-size [V, D] gradient for the lookup).
    """
    axis = spec[0]
    if axis is None or spec[1] is not None:  # rows not split (fallback layouts): look up in the whole table
        return embed_tokens({"embed": sharding.gather(local_embed, spec)}, tokens, model_cfg)
    rows = local_embed.shape[0]
    ids = jax.lax.all_gather(tokens, axis) - jax.lax.axis_index(axis) * rows  # [f, b, T], local row numbers
    mine = (ids >= 0) & (ids < rows)
    x = embed_tokens({"embed": local_embed}, jnp.where(mine, ids, 0), model_cfg)  # [f, b, T, D]
    x = jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))
    return jax.lax.psum_scatter(x, axis, scatter_dimension=0)  # [b, T, D]: exactly one device adds non-zeros


def fsdp_hidden_states(
    local: dict, tokens: jax.Array, attention_mask: jax.Array, model_cfg: GemmaConfig, specs: dict, *,
    remat: bool = False, group: int = 1, tail: int | None = None,
) -> tuple[jax.Array, int]:
    """model.hidden_states inside shard_map: each layer's weights are all-gathered over fsdp as it runs.

    `local` holds this device's param shards. Only one layer's full weights exist at a time. The
    gathered weights are never saved for the backward pass (re-gathered there instead, as FSDP does);
    with remat, nothing inside a layer is saved either.
    Returns (h, col): the final-normed states of columns col .. T - 1, [b, T - col, D]. col is 0, unless the rows
    are whole GRPO groups of `group` > 1 rows sharing their columns before the last `tail` (model/shared_prompt.py):
    then each group's prompt runs once and col = Tp - 1 (the last prompt state, then the completion's).
    """
    positions = default_positions(tokens, attention_mask)  # [b, T]
    valid = attention_mask.astype(bool)
    sharing = prompt_sharing(*tokens.shape, group, tail)
    layer = None
    if sharing is not None:  # one packed row [1, P*Tp + b*Tc]
        tokens, positions, valid = (pack(a, sharing) for a in (tokens, positions, valid))
        layer = functools.partial(shared_prompt_layer, sharing=sharing)
    x = embed_lookup(local["embed"], tokens, specs["embed"], model_cfg)  # [b, T, D] (packed: [1, N, D])
    per_layer = sharding.layer_specs(specs)

    def gather_layer(lp_local: dict) -> dict:  # one layer's full weights, tagged so the policy never saves them
        return jax.tree.map(lambda w, s: checkpoint_name(sharding.gather(w, s), GATHERED), lp_local, per_layer)

    policy = (jax.checkpoint_policies.nothing_saveable if remat
              else jax.checkpoint_policies.save_anything_except_these_names(GATHERED))
    x, _ = scan_layers(local["layers"], x, positions, valid, model_cfg, prepare_layer=gather_layer, remat_policy=policy,
                       layer=layer)
    final_norm = sharding.gather(local["final_norm"], specs["final_norm"])
    h = rms_norm(x, final_norm, model_cfg.rms_eps)
    return (h, 0) if sharing is None else (tail_states(h, sharing), sharing.prompt_len - 1)


def pad_columns(x: jax.Array, n: int) -> jax.Array:
    """[b, t] -> [b, n + t] with n zero columns in front (per-token values of the columns skipped)."""
    return jnp.pad(x, ((0, 0), (n, 0))) if n else x


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


def make_sharded_logprobs(
    model_cfg: GemmaConfig, mesh: Mesh, *, chunk: int = DEFAULT_CHUNK, temperature: float = 1.0,
    tail: int | None = None, compute_dtype: str | None = None, num_micro_batches: int = 1,
    lora_cfg: LoraConfig | None = None, compiler_options: dict | None = None, group: int = 1,
):
    """Jitted fn(params, tokens, attention_mask) -> [B, T] float32 logprobs on the mesh; with lora_cfg,
    fn(params, adapters, tokens, attention_mask) under base + adapters.

    Params (and adapters) laid out as grpo/sharding.py says; rows split over (data, fsdp); output the same way.
    compute_dtype and num_micro_batches: as the training step uses them (weights cast, each device's rows in
    M pieces), so old and reference log-probs are bit-identical to the step's own; `make_step_logprobs`
    reads all of these from a GRPOConfig. group > 1: rows come in GRPO groups of that many sharing their
    columns before the tail, and each group's prompt is run once (see sharded_token_logprobs).
    """
    specs = sharding.param_specs(model_cfg, mesh)
    adapter_specs = {} if lora_cfg is None else sharding.adapter_specs(model_cfg, lora_cfg, mesh)
    weight_specs = specs if lora_cfg is None else attach(specs, adapter_specs)
    rows = sharding.batch_spec(2)

    def body(local, local_adapters, tokens, attention_mask):
        w = local if lora_cfg is None else with_adapters(local, local_adapters, lora_cfg)
        w = cast_params(w, compute_dtype)
        split = lambda x: x.reshape(num_micro_batches, -1, x.shape[1])  # [M, b / M, T]
        one = lambda mb: sharded_token_logprobs(w, *mb, model_cfg, weight_specs, chunk=chunk,
                                                temperature=temperature, tail=tail, group=group)[0]
        return jax.lax.map(one, (split(tokens), split(attention_mask))).reshape(tokens.shape)

    # in: params (and adapters) per the rules table, tokens and mask split by rows; out: logprobs split by rows.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs, adapter_specs, rows, rows), out_specs=rows,
                           check_vma=True)

    def run(params, adapters, tokens, attention_mask):
        _check_tokens(tokens, attention_mask)
        _check_rows(tokens.shape[0], mesh.size * num_micro_batches, "make_sharded_logprobs")
        return mapped(params, adapters, tokens, attention_mask.astype(jnp.int32))

    if lora_cfg is None:
        return jax.jit(lambda params, tokens, attention_mask: run(params, {}, tokens, attention_mask),
                       compiler_options=compiler_options)
    return jax.jit(run, compiler_options=compiler_options)


def make_step_logprobs(
    model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, *, lora_cfg: LoraConfig | None = None,
    compiler_options: dict | None = None,
):
    """make_sharded_logprobs with every setting the training step uses taken from grpo_cfg (chunk, temperature,
    tail, compute dtype, micro-batches, shared prompts): the old- and reference-policy passes of the training
    loop."""
    return make_sharded_logprobs(model_cfg, mesh, chunk=grpo_cfg.logits_chunk, temperature=grpo_cfg.temperature,
                                 tail=grpo_cfg.logprob_tail, compute_dtype=grpo_cfg.compute_dtype,
                                 num_micro_batches=grpo_cfg.num_micro_batches, lora_cfg=lora_cfg,
                                 compiler_options=compiler_options, group=sharing_group(grpo_cfg))


def sharing_group(grpo_cfg: GRPOConfig) -> int:
    """The row-group size whose prompts the step's passes run once: num_generations with shared_prompt, else 1."""
    return grpo_cfg.num_generations if grpo_cfg.shared_prompt else 1


def _check_tokens(tokens, attention_mask) -> None:
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2, got shape {tokens.shape}")
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")


def _check_rows(rows: int, divisor: int, what: str) -> None:
    if rows % divisor:
        raise ValueError(f"{what}: batch of {rows} rows must be divisible by {divisor} (devices x micro-batches)")

