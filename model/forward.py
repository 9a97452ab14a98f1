"""Hand-written Gemma 2 / Gemma 3 text forward pass: pure functions over the param pytree.

Numerics match HF transformers' eager attention path
(https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma2/modeling_gemma2.py and
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/modeling_gemma3.py):
- embed * sqrt(D), the constant rounded to the activation dtype first;
- RMSNorm(1 + w) computed in float32 and cast back;
- q/k RMSNorm over H (Gemma 3), then half-split ("rotate_half") RoPE with a per-layer base;
- scores * query_pre_attn_scalar**-0.5, Gemma 2 soft-cap 50*tanh(s/50), THEN the mask;
- softmax in float32; 4 norms per layer; tanh-GELU gated MLP;
- final norm, tied unembedding, Gemma 2 final soft-cap 30*tanh(z/30).

Padding: the layers take explicit token positions and a validity mask, and the attention mask is built
from positions (not buffer slots), so a left- or right-padded row gets the logits it would get alone.

One layer loop: `scan_layers` runs the stacked layers for `hidden_states`, the sampler's prefill
(model/sampler.py, which also collects each layer's k, v) and the FSDP training forward (grpo/logprobs.py,
which all-gathers each layer's weights inside the loop). The sampler's decode step reuses the pieces:
`layer_constants`, `attention_inputs` and `layer_output`, with `attend`'s numerics for one token over the cache in
model/decode_attention.py.

LoRA: a layer's weights may carry low-rank adapters under lp["lora"][name] = {"a": [in, r], "b": [r, out]}
(model/lora.py `with_adapters` puts them there, the scale already folded into b). `project` then adds
(x @ a) @ b to x @ W: W + a @ b is never formed, so the training step holds no second copy of any matrix.

Dimension letters: B batch, T query length, S key length, D model, F mlp, N query heads,
K kv heads, G = N/K, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from model.config import GLOBAL, GemmaConfig

# A finite "minus infinity": fully masked rows (padding queries) stay finite instead of NaN.
MASK_VALUE = -2.3819763e38
# Window used for global layers: larger than any sequence, so only causality applies.
NO_WINDOW = 2**30
# Key of a layer's LoRA adapters in its weight dict (see the module docstring and model/lora.py).
LORA = "lora"


def rms_norm(x: jax.Array, w: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Gemma RMSNorm: float32 math, zero-centred weight (y * (1 + w)), cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def apply_rope(x: jax.Array, positions: jax.Array, base: jax.Array, scale: jax.Array) -> jax.Array:
    """Half-split RoPE. x [B, T, n, H], positions [B, T]; base and scale may be traced per-layer scalars."""
    h = x.shape[-1]
    exponent = jnp.arange(0, h, 2, dtype=jnp.float32) / h  # [H/2]
    inv_freq = 1.0 / (base.astype(jnp.float32) ** exponent) / scale  # linear scaling divides the angle
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def layer_constants(cfg: GemmaConfig) -> dict[str, jax.Array]:
    """Per-layer scalars scanned alongside the stacked weights: window, RoPE base and scale. Each [L]."""
    is_global = [t == GLOBAL for t in cfg.layer_types]
    return {
        "window": jnp.array([NO_WINDOW if g else cfg.sliding_window for g in is_global], jnp.int32),
        "rope_base": jnp.array([cfg.rope_base_global if g else cfg.rope_base_local for g in is_global], jnp.float32),
        "rope_scale": jnp.array([cfg.rope_scale_global if g else 1.0 for g in is_global], jnp.float32),
    }


def default_positions(tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Positions count real tokens only, so left padding does not shift a row's positions."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def embed_tokens(params: dict, tokens: jax.Array, cfg: GemmaConfig) -> jax.Array:
    x = params["embed"][tokens]  # [B, T, D]
    # The sqrt(D) normaliser is rounded to the activation dtype first (bf16: sqrt(2304) -> 48.0).
    return x * jnp.asarray(cfg.embed_dim**0.5, dtype=x.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """x's last n_in dims contracted with w's first n_in: [B, T, *in] x [*in, *out] -> [B, T, *out].

    One matmul [B*T, IN] @ [IN, OUT]. The custom backward writes the weight gradient with the NARROW side of
    (x, dy) transposed explicitly: x^T @ dy when IN <= OUT (q/k/v, gate/up), (dy^T @ x)^T otherwise (o, down),
    whose [OUT, IN] result is weight-sized and cheap to transpose. Left to itself, XLA:CPU transposed the
    WIDE side (dy, e.g. [B*T, 2048] for gate/up) inside the elementwise fusion that produces it, a
    cache-hostile strided write that the step's profile showed as its costliest elementwise ops, and fed the
    result to a slower dot path (BUILD.md, "Training-step speed").

    Inside shard_map both operands are first made varying over the same mesh axes (what the plain einsum
    does implicitly), so the custom backward returns cotangents of the operands' own types and the
    transpose of that cast sums the weight gradient over the axes the weight is replicated on.
    """
    x, w = match_varying(x, w)
    return _dense_vjp(x, w, n_in)


def match_varying(*arrays: jax.Array) -> list[jax.Array]:
    """Inside shard_map: each array pcast to varying over the union of the mesh axes any of them varies over
    (a no-op outside shard_map). What a plain binary op does implicitly, made explicit for custom VJPs, whose
    backward must return cotangents of their inputs' own types."""
    union = frozenset().union(*(varying_axes(a) for a in arrays))
    missing = [tuple(sorted(union - varying_axes(a))) for a in arrays]
    return [jax.lax.pcast(a, m, to="varying") if m else a for a, m in zip(arrays, missing, strict=True)]


def cpu_barrier(x: jax.Array) -> jax.Array:
    """On XLA:CPU, an optimization barrier: keeps an explicit transpose from being folded into the next dot as a
    layout change of the dot's OTHER, wider operand (see `dense`). Elsewhere x itself: GPU and TPU dots read
    transposed operands natively, and the barrier would only force a copy."""
    return jax.lax.optimization_barrier(x) if cpu_layouts() else x


# Whether the XLA:CPU-only layout choices apply (cpu_barrier; the fused unembedding's transposed embedding).
# None: when jax's default backend is CPU. bin/inspect compiles on CPU to estimate a TPU's or GPU's memory, and
# turns them off there (`compiling_for_accelerator`), so its numbers describe the accelerator's program.
_CPU_LAYOUTS: bool | None = None


def cpu_layouts() -> bool:
    return jax.default_backend() == "cpu" if _CPU_LAYOUTS is None else _CPU_LAYOUTS


@contextlib.contextmanager
def compiling_for_accelerator():
    """Within: trace as for a TPU / GPU (no CPU-only layout choices), even on XLA:CPU."""
    global _CPU_LAYOUTS
    saved, _CPU_LAYOUTS = _CPU_LAYOUTS, False
    try:
        yield
    finally:
        _CPU_LAYOUTS = saved


def varying_axes(a: jax.Array) -> frozenset[str]:
    """The shard_map mesh axes `a` varies over (empty outside shard_map)."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_vjp(x, w, n_in):
    return _dense(x, w, n_in)


def _dense(x, w, n_in):
    lead, inner = x.shape[: x.ndim - n_in], w.shape[:n_in]
    out = w.shape[n_in:]
    y = x.reshape(-1, math.prod(inner)) @ w.reshape(math.prod(inner), -1)  # [B*T, OUT]
    return y.reshape(*lead, *out)


def _dense_fwd(x, w, n_in):
    # symbolic_zeros: a frozen weight (LoRA's base) is not perturbed, so its gradient is never computed.
    return _dense(x.value, w.value, n_in), (x.value, w.value, w.perturbed)


def _dense_bwd(n_in, res, dy):
    x, w, w_grad = res
    k = math.prod(w.shape[:n_in])
    x2 = x.reshape(-1, k)  # [B*T, IN]
    g = dy.reshape(x2.shape[0], -1)  # [B*T, OUT]
    dx = (g @ w.reshape(k, -1).T).reshape(x.shape)
    if not w_grad:
        return dx, None
    if k <= g.shape[1]:  # x is the narrow side (q/k/v, gate/up): dw = x^T @ dy
        dw = cpu_barrier(x2.T) @ g  # [IN, B*T] @ [B*T, OUT]
    else:  # dy is (down [.., 2048] -> 640, o 1024 -> 640): dw = (dy^T @ x)^T, the small [OUT, IN] result transposed
        dw = cpu_barrier(cpu_barrier(g.T) @ x2).T  # the outer barrier keeps XLA from folding the .T back into the dot
    return dx, dw.reshape(w.shape)


_dense_vjp.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def project(x: jax.Array, lp: dict, name: str, equation: str) -> jax.Array:
    """x times the weight lp[name] (as `equation` says: x's trailing dims against w's leading ones), plus the
    LoRA update (x @ a) @ b if lp carries one.

    The update runs in x's dtype (float32 adapters meet bf16 activations without promoting them) and is
    reshaped to the projection's output: in is x's trailing dims flattened (o: N*H), out the weight's (q: N*H).
    """
    n_in = len(equation.split(",")[0]) - 2  # "btnh,nhd->btd": contract x's trailing n and h with w's leading
    y = dense(x, lp[name], n_in)
    pair = lp.get(LORA, {}).get(name)
    if pair is None:
        return y
    with jax.named_scope(f"lora_{name}"):
        low = x.reshape(*x.shape[:2], -1) @ pair["a"].astype(x.dtype)  # [B, T, r]
        return y + (low @ pair["b"].astype(x.dtype)).reshape(y.shape).astype(y.dtype)


def attention_inputs(lp: dict, x: jax.Array, c: dict, positions: jax.Array, cfg: GemmaConfig):
    """Pre-attention norm, q/k/v projections, Gemma 3 q/k norms, RoPE. Returns q [B,T,N,H], k, v [B,T,K,H]."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q = project(h, lp, "q", "btd,dnh->btnh")
    k = project(h, lp, "k", "btd,dkh->btkh")
    v = project(h, lp, "v", "btd,dkh->btkh")
    if cfg.use_qk_norm:  # Gemma 3: RMSNorm over head_dim after projection, before RoPE
        q = rms_norm(q, lp["q_norm"], cfg.rms_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_eps)
    q = apply_rope(q, positions, c["rope_base"], c["rope_scale"])
    k = apply_rope(k, positions, c["rope_base"], c["rope_scale"])
    return q, k, v


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array, window: jax.Array) -> jax.Array:
    """[B, T, S] bool: key j visible to query i iff valid and 0 <= pos_i - pos_j < window."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    return (diff >= 0) & (diff < window) & k_valid[:, None, :]


def attend(q, k, v, q_pos, k_pos, k_valid, window, cfg: GemmaConfig) -> jax.Array:
    """Grouped-query attention. q [B,T,N,H]; k, v [B,S,K,H]; positions [B,T] / [B,S]. Returns [B,T,N,H]."""
    b, t, n, h = q.shape
    kh = cfg.num_kv_heads
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: kv head j serves query heads j*G .. j*G+G-1
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * cfg.query_pre_attn_scalar**-0.5
    scores = softcap(scores, cfg.attn_softcap)  # soft-cap BEFORE masking, or masked scores cap at -50
    mask = attention_mask(q_pos, k_pos, k_valid, window)  # [B, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU, 0.5 x (1 + tanh(c (x + 0.044715 x^3))), with c = sqrt(2 / pi).

    Same values as jax.nn.gelu(approximate=True); the custom derivative makes the backward pass keep ONE
    array (gelu'(x)) per MLP instead of the ~6 intermediates autodiff saves for tanh's chain, which the
    profile of the training step showed as its most expensive elementwise op (BUILD.md, "Training-step speed").
    """
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    c = jnp.asarray((2.0 / jnp.pi) ** 0.5, x.dtype)
    t = jnp.tanh(c * (x + 0.044715 * x**3))
    y = jax.nn.gelu(x, approximate=True)  # the primal exactly as without derivatives (log-prob passes match)
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    return y, slope * dx


def layer_output(lp: dict, x: jax.Array, attn: jax.Array, cfg: GemmaConfig) -> jax.Array:
    """Output projection, the post-attention norm and residual, then the MLP block with its two norms."""
    a = project(attn, lp, "o", "btnh,nhd->btd")
    x = x + rms_norm(a, lp["post_attn_norm"], cfg.rms_eps)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["pre_ffw_norm"], cfg.rms_eps)
        gate = gelu_tanh(project(h, lp, "gate", "btd,df->btf"))
        up = project(h, lp, "up", "btd,df->btf")
        m = project(gate * up, lp, "down", "btf,fd->btd")
    return x + rms_norm(m, lp["post_ffw_norm"], cfg.rms_eps)


def decoder_layer(lp, x, c, positions, valid, cfg: GemmaConfig) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One full-sequence (no cache) decoder layer: (output [B, T, D], its post-RoPE k, v [B, T, K, H]).

    k and v come back so the sampler's prefill can cache them; callers that do not need them drop them.
    """
    with jax.named_scope("attention"):
        q, k, v = attention_inputs(lp, x, c, positions, cfg)
        attn = attend(q, k, v, positions, positions, valid, c["window"], cfg)
    return layer_output(lp, x, attn, cfg), (k, v)


def scan_layers(
    layers: dict,
    x: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    cfg: GemmaConfig,
    *,
    prepare_layer: Callable[[dict], dict] | None = None,
    remat_policy: Callable | None = None,
    collect_kv: bool = False,
    layer: Callable | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """The decoder stack: one lax.scan over the stacked [L, ...] `layers` (one layer compiled, not L).

    x [B, T, D] embedded tokens; positions [B, T] int; valid [B, T] bool. Returns (x [B, T, D] before the
    final norm, kv): kv is every layer's post-RoPE (k, v), each [L, B, T, K, H], with collect_kv (the
    sampler's prefill fills its cache from them), else None.
    prepare_layer: maps one layer's weights to what the layer uses, inside the scan body (FSDP: all-gather
    the local shards, so only one layer's full weights exist at a time).
    remat_policy: jax.checkpoint the body with this policy (None: no remat, save everything).
    layer: the layer function, decoder_layer's signature (default decoder_layer; model/shared_prompt.py passes
    one whose tokens are a GRPO batch with each group's prompt stored once).
    """
    layer_fn = decoder_layer if layer is None else layer

    def body(x, weights):
        lp, c = weights
        lp = lp if prepare_layer is None else prepare_layer(lp)
        x, kv = layer_fn(lp, x, c, positions, valid, cfg)
        return x, (kv if collect_kv else None)

    # prevent_cse=False: inside a scan XLA cannot merge the backward recompute into the forward pass, so the
    # guard against that (which also blocks other optimisations) is not needed.
    if remat_policy is not None:
        body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
    with jax.named_scope("layers"):
        return jax.lax.scan(body, x, (layers, layer_constants(cfg)))


def hidden_states(
    params: dict,
    tokens: jax.Array,
    cfg: GemmaConfig,
    *,
    attention_mask: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] (before the unembedding).

    remat: keep only each layer's input for the backward pass and recompute the layer's inside there.
    """
    positions = default_positions(tokens, attention_mask)
    valid = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    policy = jax.checkpoint_policies.nothing_saveable if remat else None
    x, _ = scan_layers(params["layers"], embed_tokens(params, tokens, cfg), positions, valid, cfg, remat_policy=policy)
    return rms_norm(x, params["final_norm"], cfg.rms_eps)


def unembed(params: dict, x: jax.Array, cfg: GemmaConfig) -> jax.Array:
    """Tied unembedding (no sqrt(D) here) and the Gemma 2 final soft-cap; float32 logits [..., V]."""
    with jax.named_scope("unembed"):
        logits = jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
        return softcap(logits, cfg.final_softcap)


def forward(
    params: dict,
    tokens: jax.Array,
    cfg: GemmaConfig,
    *,
    attention_mask: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """Logits float32 [B, T, V] for tokens [B, T]. attention_mask [B, T]: 1 for real tokens, 0 for padding."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if attention_mask is not None and jnp.shape(attention_mask) != tokens.shape:
        raise ValueError(f"attention_mask shape {jnp.shape(attention_mask)} != tokens shape {tokens.shape}")
    h = hidden_states(params, tokens, cfg, attention_mask=attention_mask, remat=remat)
    return unembed(params, h, cfg)
