"""A GRPO run's programs (forward, the step's log-prob pass, the step) lowered and compiled from abstract shapes:
their FLOPs and per-device memory, and whether a machine preset holds them. bin/inspect is its command line.

No weights are needed: params, optimizer state and batch are ShapeDtypeStructs carrying their shardings
(grpo.step.abstract_step_inputs), so the caller only has to have made the mesh's devices (bin/inspect fakes
them on CPU) before anything here lowers. Every program goes through the one-policy interface
(grpo/policy.py): the step is make_policy_step(policy), the log-prob pass make_policy_logprobs(policy) with the
step's settings, whatever the fine-tuning mode (LoRA: the adapters and their Adam state trained and donated, the
base params a read-only input).

Why the numbers need care (BUILD.md has the measured ones):
- XLA counts a while loop's body once, not once per trip, so cost_analysis() FLOPs miss the layer and
  micro-batch scans: `analytic_flops` counts the matmuls of the whole batch beside it.
- XLA:CPU computes bf16 work in float32 and hoists a float32 copy of the bf16 weight stack out of the layer
  scan, which a TPU or GPU never makes: `accelerator_estimate` and `machine_check` compile the float32-weight
  program instead and count the params as stored.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grpo import planner
from grpo.config import GRPOConfig
from grpo.fsdp_forward import check_rows
from grpo.logprobs import make_policy_logprobs, step_settings
from grpo.policy import make_policy
from grpo.presets import GIB, Machine
from grpo.sharding import make_mesh
from grpo.step import abstract_step_inputs, make_policy_step
from model.config import GemmaConfig
from model.forward import forward
from model.lora import LoraConfig, num_adapter_params
from model.params import abstract_params

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class InspectOptions:
    """Which program, at which shape and layout (bin/inspect's flags, checked)."""

    what: str  # "forward" | "logprobs" | "step"
    batch: int  # rows of the global batch
    seq_len: int  # tokens per row
    mesh: str  # data=N,fsdp=M as given (reported)
    data: int
    fsdp: int
    dtype: str  # --dtype as given (reported)
    param_dtype: object  # the params' storage dtype
    compute_dtype: str | None  # weights cast to this for forward / backward
    lora_cfg: LoraConfig | None  # None: full fine-tuning
    # the step's GRPOConfig fields; no defaults here, so bin/inspect's flags are the one place they are set
    num_micro_batches: int
    remat: bool
    beta: float
    num_generations: int
    shared_prompt: bool
    logits_chunk: int
    logprob_tail: int | None

    def __post_init__(self):
        if self.logprob_tail is not None and not 1 <= self.logprob_tail < self.seq_len:
            raise ValueError(f"--logprob_tail must be in 1..{self.seq_len - 1} (--seq_len - 1), "
                             f"got {self.logprob_tail}")
        if self.lora_cfg is not None and self.what == "forward":
            raise ValueError("--lora_rank applies to --what logprobs or step, not forward")
        per_call = self.batch // max(self.devices * self.num_micro_batches, 1)  # rows one device's pass holds
        if self.shared_prompt and self.what != "forward" and (self.logprob_tail is None
                                                              or per_call % self.num_generations):
            raise ValueError(f"--shared_prompt needs --logprob_tail (the prompt: the columns before it) and each "
                             f"device's micro-batch ({per_call} rows) in whole groups of --num_generations "
                             f"{self.num_generations}; the step would run every row whole")
        if self.what != "forward":  # the rows check the step makes while lowering, made here with the flags' names
            try:
                check_rows(self.batch, types.SimpleNamespace(size=self.devices), self.num_micro_batches, self.what)
            except ValueError:
                raise ValueError(f"--batch {self.batch} must be a multiple of the --mesh's {self.devices} devices x "
                                 f"--num_micro_batches {self.num_micro_batches}") from None

    @property
    def devices(self) -> int:
        return 1 if self.what == "forward" else self.data * self.fsdp

    @property
    def lora(self) -> bool:
        return self.lora_cfg is not None  # never with forward (__post_init__)

    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig(num_micro_batches=self.num_micro_batches, remat=self.remat, beta=self.beta,
                          logits_chunk=self.logits_chunk, compute_dtype=self.compute_dtype,
                          logprob_tail=self.logprob_tail, num_generations=self.num_generations,
                          shared_prompt=self.shared_prompt)

    def float32_program(self) -> InspectOptions:
        """The same program with float32 weights and compute: no XLA:CPU copies of bf16 weights."""
        return dataclasses.replace(self, param_dtype=jnp.float32, compute_dtype=None)


def check_platform(platform: str) -> None:
    """JAX's backend for `platform` started (bin/inspect picked it before any backend ran), or a ValueError naming
    --platform: a GPU asked for on a machine without one is a bad flag, not a traceback."""
    try:
        jax.devices()
    except RuntimeError as e:  # JAX's hint to set JAX_PLATFORMS does not apply: the flag sets it
        raise ValueError(f"--platform {platform}: JAX cannot start it here ({str(e).split(' (set JAX_PLATFORMS')[0]})"
                         ) from None


def analytic_flops(cfg: GemmaConfig, rows: int, seq: int, what: str, remat: bool, lora: bool = False) -> float:
    """Matmul FLOPs for the whole batch: projections, MLP, full [T, T] attention scores (as computed), unembed.

    The step's backward is the activation gradient (1x forward) plus, in full fine-tuning, the weight gradient
    (1x); LoRA has no base weight gradient (the adapters' own matmuls, ~1% at rank 16, are not counted)."""
    d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token_layer = 2 * d * h * (2 * n + 2 * k) + 6 * d * f + 4 * n * h * seq
    layers = rows * seq * cfg.num_layers * per_token_layer
    unembed = rows * seq * 2 * d * cfg.vocab_size
    if what != "step":
        return layers + unembed
    # backward = 2x forward (1x with LoRA); the unembedding chunks are always recomputed, the layers with remat
    return (2 if lora else 3) * (layers + unembed) + unembed + (layers if remat else 0)


def lower(cfg: GemmaConfig, opts: InspectOptions):
    """The jax `Lowered` of opts.what, from abstract inputs laid out on a data x fsdp mesh (forward: one device)."""
    shape = (opts.batch, opts.seq_len)
    if opts.what == "forward":
        fwd = jax.jit(forward, static_argnums=2, static_argnames="remat")
        return fwd.lower(abstract_params(cfg, opts.param_dtype), jax.ShapeDtypeStruct(shape, jnp.int32), cfg,
                         attention_mask=jax.ShapeDtypeStruct(shape, jnp.int32))
    mesh = make_mesh(data=opts.data, fsdp=opts.fsdp)
    grpo_cfg = opts.grpo_config()
    policy = make_policy(cfg, opts.lora_cfg)
    keys = ("old_logprobs", "ref_logprobs") if opts.beta else ("old_logprobs",)
    frozen, trained, state, batch = abstract_step_inputs(policy, grpo_cfg, mesh, *shape, param_dtype=opts.param_dtype,
                                                         optional_keys=keys)
    if opts.what == "step":
        return make_policy_step(policy, grpo_cfg, mesh).lower(frozen, trained, state, batch)
    fn = make_policy_logprobs(policy, mesh, **step_settings(grpo_cfg))  # the step's old-policy / reference pass
    return fn.lower(frozen, trained, batch["tokens"], batch["attention_mask"])


def numbers(cfg: GemmaConfig, opts: InspectOptions, compiled) -> dict:
    """Every number the report prints, by name (bytes are per device); bin/inspect --json prints this dict."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    lcfg, lora = opts.lora_cfg, opts.lora
    return {
        "preset": cfg.name, "params": cfg.num_params(), "dtype": opts.dtype, "what": opts.what,
        "batch": opts.batch, "seq_len": opts.seq_len, "devices": opts.devices,
        "mesh": opts.mesh if opts.what != "forward" else None,
        "num_micro_batches": opts.num_micro_batches, "remat": opts.remat, "compute_dtype": opts.compute_dtype,
        "lora_rank": lcfg.rank if lora else 0, "lora_alpha": lcfg.alpha if lora else None,
        "lora_targets": list(lcfg.targets) if lora else None,
        "adapter_params": num_adapter_params(cfg, lcfg) if lora else 0,
        "cost_analysis_flops_per_device": float(cost.get("flops", float("nan"))),
        "analytic_flops_per_device": analytic_flops(cfg, opts.batch, opts.seq_len, opts.what, opts.remat,
                                                    lora) / opts.devices,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes_per_device": planner.compiled_peak_bytes(compiled),
    }


def measure(cfg: GemmaConfig, opts: InspectOptions, with_accelerator_estimate: bool = False) -> tuple:
    """(lowered, compiled, numbers) of opts' program; with_accelerator_estimate adds `accelerator_estimate`'s."""
    lowered = lower(cfg, opts)
    compiled = lowered.compile()
    n = numbers(cfg, opts, compiled)
    if with_accelerator_estimate:
        n.update(accelerator_estimate(cfg, opts, n))
    return lowered, compiled, n


def _size(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if n >= GIB else f"{n / MIB:9.3f} MiB"


def report(n: dict) -> str:
    """The human-readable report of `numbers` (with a machine's check or the accelerator estimate if present)."""
    lines = [
        f"preset {n['preset']}: {n['params'] / 1e6:,.1f}M params, {n['dtype']}"
        + (f"; LoRA rank {n['lora_rank']}, alpha {n['lora_alpha']:g} on {','.join(n['lora_targets'])}: "
           f"{n['adapter_params'] / 1e6:,.2f}M trainable" if n["lora_rank"] else ""),
        f"what {n['what']}: batch {n['batch']} x {n['seq_len']} tokens on {n['devices']} device(s)"
        + (f" (mesh {n['mesh']})" if n["what"] != "forward" else "")
        + (f", {n['num_micro_batches']} micro-batches, remat={n['remat']}, compute_dtype={n['compute_dtype']}"
           if n["what"] == "step" else ""),
        f"cost_analysis flops per device: {n['cost_analysis_flops_per_device']:.4g} (loop bodies counted once)",
        f"analytic matmul flops per device: {n['analytic_flops_per_device']:.4g}",
        "memory_analysis per device:",
        f"  arguments   {_size(n['argument_bytes'])}",
        f"  outputs     {_size(n['output_bytes'])}",
        f"  aliased     {_size(n['alias_bytes'])} (donated inputs reused for outputs)",
        f"  temporaries {_size(n['temp_bytes'])}",
        f"  peak ~      {_size(n['peak_bytes_per_device'])} (arguments + outputs - aliased + temporaries)",
    ]
    if "machine" in n:
        bar = n["fit_fraction"] * n["device_bytes"]
        lines += [f"machine {n['machine']}: {_size(n['device_bytes'])} per device, bar {_size(int(bar))} "
                  f"({n['fit_fraction']:.2f}x); {n['compiled_as']}",
                  *([f"  reference {_size(n['reference_bytes_per_device'])} (full fine-tuning with a KL term "
                     "keeps the weights' reference copy on the device)"] if n["reference_bytes_per_device"] else []),
                  f"  {n['what']:8s} {_size(n['peak_bytes_per_device'] + n['reference_bytes_per_device'])}  fits: "
                  f"{n['step_fits']}",
                  f"  rollout  {_size(n['rollout_bytes_per_device'])}  fits: {n['rollout_fits']} "
                  f"({n['rollout_rows']} rows per sampler call; upper bound, see grpo/planner.py)",
                  f"fits: {n['fits']}"]
    if "accelerator_estimate_bytes" in n:
        lines += [f"  float32 program's temporaries {_size(n['float32_temp_bytes'])}",
                  f"  accelerator ~ {_size(n['accelerator_estimate_bytes'])} (peak with the float32 program's "
                  f"temporaries: no XLA:CPU float32 copies of bf16 weights; activations sized as float32)"]
    return "\n".join(lines)


def accelerator_estimate(cfg: GemmaConfig, opts: InspectOptions, n: dict) -> dict:
    """XLA:CPU computes bf16 work in float32 and, for dynamic-slice (the layer scan), converts the WHOLE bf16
    weight stack to float32 and hoists it out of the loops: a float32 copy of the weights that a TPU or GPU
    never makes. Compiling the same program with float32 weights has no such copies and sizes every activation
    as float32 (an accelerator's bf16 ones are half), so bf16 arguments + its temporaries is a conservative
    estimate of the accelerator's peak."""
    temp32 = lower(cfg, opts.float32_program()).compile().memory_analysis().temp_size_in_bytes
    return {"float32_temp_bytes": temp32,
            "accelerator_estimate_bytes": n["peak_bytes_per_device"] - n["temp_bytes"] + temp32}


def stored_bytes_per_device(cfg: GemmaConfig, dtype, shards: int, lora: bool, beta: float) -> int:
    """What the step keeps between steps on one device: params as stored (FSDP-split), plus for full fine-tuning
    the two float32 Adam moments (and a reference copy when beta > 0); LoRA's adapters are a rounding error."""
    stored = cfg.num_params() * np.dtype(dtype).itemsize
    if not lora:
        stored += cfg.num_params() * 8 + (stored if beta else 0)
    return stored // shards


def machine_check(cfg: GemmaConfig, opts: InspectOptions, machine: Machine, rollout_rows: int | None = None,
                  max_new_tokens: int | None = None) -> dict:
    """The machine's fit: the step compiled with float32 compute (no XLA:CPU bf16 copies; activations sized as
    float32, at least an accelerator's bf16 ones), its parameter arguments counted at the machine's storage
    dtype; plus the rollout's upper bound (grpo/planner.py `rollout_bytes`) at `rollout_rows` rows per sampler
    call (default: the machine's, at most the batch) with `max_new_tokens` inside seq_len (default: seq_len less
    TinyZero's prompt budget)."""
    if rollout_rows is not None and rollout_rows < 1:
        raise ValueError(f"--rollout_batch_size must be >= 1 (or left out: the machine's), got {rollout_rows}")
    if max_new_tokens is not None and not 1 <= max_new_tokens < opts.seq_len:
        raise ValueError(f"--max_new_tokens must be in 1..{opts.seq_len - 1} (inside --seq_len), got {max_new_tokens}")
    n = numbers(cfg, opts, lower(cfg, opts.float32_program()).compile())
    itemsize = np.dtype(opts.param_dtype).itemsize
    # bf16 storage: the float32 stand-in's params (and Adam state, kept in the params' dtype) are twice the real
    # ones; taken off the arguments and the peak alike, so the report's lines still add up
    stored_as = _state_bytes(cfg, opts.float32_program()) - _state_bytes(cfg, opts)
    n["peak_bytes_per_device"] -= stored_as
    n["argument_bytes"] -= stored_as
    # full fine-tuning with a KL term keeps a frozen reference copy on the device beside the step (grpo/planner.py)
    reference = cfg.num_params() * itemsize // opts.fsdp if opts.beta and not opts.lora else 0
    new_tokens = max_new_tokens or max(1, opts.seq_len - planner.PROMPT_TOKENS)
    rows = rollout_rows or min(machine.rollout_rows, opts.batch)
    sample_bytes = 2 if (opts.compute_dtype == "bfloat16" or itemsize == 2) else 4
    stored = stored_bytes_per_device(cfg, opts.param_dtype, opts.fsdp, opts.lora, opts.beta)
    rollout = planner.rollout_bytes(cfg, rows, min(opts.seq_len, planner.PROMPT_TOKENS + new_tokens),
                                    sample_dtype_bytes=sample_bytes, stored_bytes_per_device=stored)
    n.update({
        "machine": machine.name,
        "compiled_as": "float32 compute (an upper bound for bfloat16 compute), params counted as stored",
        "device_bytes": machine.device_bytes(), "fit_fraction": machine.budget_bytes() / machine.device_bytes(),
        "rollout_rows": rows, "rollout_bytes_per_device": rollout,
        "reference_bytes_per_device": reference,
        "step_fits": planner.fits(n["peak_bytes_per_device"] + reference, machine),
        "rollout_fits": planner.fits(rollout, machine),
    })
    n["fits"] = n["step_fits"] and n["rollout_fits"]
    return n


def _state_bytes(cfg: GemmaConfig, opts: InspectOptions) -> int:
    """Per device: the params and (for the step) the Adam state as the program receives them (fsdp-sharded)."""
    mesh = make_mesh(data=opts.data, fsdp=opts.fsdp)
    frozen, trained, state, _ = abstract_step_inputs(make_policy(cfg, opts.lora_cfg), opts.grpo_config(), mesh,
                                                     opts.batch, opts.seq_len, param_dtype=opts.param_dtype)
    trees = (frozen, trained, state) if opts.what == "step" else (frozen, trained)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(trees)) // opts.fsdp


def dump_hlo(lowered, compiled, out_dir: Path, what: str) -> None:
    """<what>.stablehlo.mlir (as lowered) and <what>.optimized.hlo.txt (as compiled) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{what}.stablehlo.mlir").write_text(lowered.as_text())
    (out_dir / f"{what}.optimized.hlo.txt").write_text(compiled.as_text())
