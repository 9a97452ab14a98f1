"""Lower and compile forward / logprobs / the GRPO step for a preset with abstract shapes; print FLOPs and memory.

No weights are needed: params, optimizer state and batch are ShapeDtypeStructs carrying their shardings.
`forward` compiles on one device; `logprobs` (the sharded old/ref pass) and `step` compile on a
data x fsdp mesh of fake CPU devices (--xla_force_host_platform_device_count is set here, before jax
is imported), so a laptop can check whether a TPU v3-8 layout fits in 16 GiB per core.

    bin/inspect --preset gemma2-2b --what step --batch 64 --seq_len 1024 --mesh data=1,fsdp=8 \\
        --num_micro_batches 8 --remat --dtype float32

With --lora_rank > 0, `step` is the LoRA step (grpo/lora_step.py: adapters and their Adam state trained and
donated, the base params a read-only input) and `logprobs` the base + adapters pass. --json adds one JSON
object with every number on the last line of stdout.

    bin/inspect --preset gemma2-2b --what step --batch 16 --seq_len 1024 --mesh data=1,fsdp=1 \
        --lora_rank 16 --num_micro_batches 4 --remat --dtype bfloat16 --json

Numbers are what XLA's CPU compiler reports for the per-device program: memory_analysis() bytes
(arguments, outputs, temporaries; the step donates params and optimizer state, so they alias) and
cost_analysis() FLOPs. XLA counts a while loop's body once, not once per trip, so its FLOPs miss the
layer and micro-batch scans: an analytic matmul count is printed beside it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from absl import flags

from bin import cli, machines
from bin.cli import FlagError

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "gemma2-2b", "model preset (see model.PRESETS), or tiny-gemma2 / tiny-gemma3")
flags.DEFINE_enum("what", "forward", ["forward", "logprobs", "step"], "which function to lower")
flags.DEFINE_integer("batch", 8, "rows (sequences) in the global batch")
flags.DEFINE_integer("seq_len", 1024, "tokens per row (prompt + completion)")
cli.define_mesh_flag("data=1,fsdp=8")
flags.DEFINE_integer("num_micro_batches", 1, "gradient-accumulation micro-batches (step)")
flags.DEFINE_bool("remat", False, "recompute layer activations in the backward pass (step)")
cli.define_dtype_flag("bfloat16")
flags.DEFINE_enum("compute_dtype", None, ["bfloat16", "float32"],
                  "cast weights to this dtype for forward/backward (step); e.g. float32 params + bfloat16 compute. "
                  "Default: what --dtype implies on an accelerator (auto: bfloat16)")
flags.DEFINE_float("beta", 0.0, "KL coefficient; > 0 adds the ref_logprobs input (step)")
flags.DEFINE_integer("num_generations", 8, "rows per prompt (G) of the batch (step, logprobs; with --shared_prompt)")
flags.DEFINE_bool("shared_prompt", False, "each group of --num_generations rows shares the columns before "
                  "--logprob_tail, run once (GRPOConfig.shared_prompt; bin/train's default). Off: every row whole, "
                  "an upper bound (the --machine fit checks use it)")
flags.DEFINE_integer("logits_chunk", 256, "tokens per unembedding chunk (logprobs, step)")
flags.DEFINE_integer("logprob_tail", None, "log-probs only for the last N positions, as bin/train does with its "
                     "completion budget (logprobs, step); default: every position")
cli.define_lora_flags()
flags.DEFINE_bool("accelerator_estimate", False,
                  "with --dtype bfloat16 on CPU: also compile the program with float32 weights and report these "
                  "arguments + ITS temporaries, leaving out XLA:CPU's float32 copies of bf16 weights (see BUILD.md)")
flags.DEFINE_string("machine", None, "A machine preset (bin/machines.py): its mesh, dtype, micro-batches, remat, "
                    "LoRA rank and checked batch shape (explicit flags win); adds device_bytes, the rollout's "
                    "estimate and fits. Choose from " + ", ".join(machines.MACHINES))
flags.DEFINE_integer("rollout_batch_size", None, "With --machine: rows per sampler call (default: the machine's).")
flags.DEFINE_integer("max_new_tokens", None, "With --machine: completion budget inside --seq_len for the rollout "
                     f"estimate (default: --seq_len - {machines.PROMPT_TOKENS}).")
flags.DEFINE_bool("json", False, "print one JSON object with every reported number as the last line of stdout")
flags.DEFINE_string("dump_hlo", None, "directory to write <what>.stablehlo.mlir and <what>.optimized.hlo.txt")
flags.DEFINE_bool("stablehlo", False, "print the StableHLO text to stdout")
flags.DEFINE_string("platform", "cpu", "JAX platform; cpu makes as many fake devices as the mesh needs")

GIB = 2**30
MIB = 2**20


def model_config(preset: str):
    return cli.preset_config(preset)


def analytic_flops(cfg, rows: int, seq: int, what: str, remat: bool, lora: bool = False) -> float:
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


def _dtypes():
    """(param dtype, compute dtype): --dtype as an accelerator would resolve it, --compute_dtype overriding."""
    dtype, compute_dtype = cli.resolve_dtypes(FLAGS.dtype, backend="accelerator")
    return dtype, FLAGS.compute_dtype or compute_dtype


def lora_config(cfg):
    """--lora_* as a LoraConfig (checked against the model), or None for full fine-tuning."""
    from model.lora import TARGETS, LoraConfig, validate_lora

    lcfg = LoraConfig(FLAGS.lora_rank, FLAGS.lora_alpha, tuple(FLAGS.lora_targets or TARGETS))
    validate_lora(lcfg, cfg)
    return lcfg if lcfg.rank else None


def lower(cfg, what: str, dtypes: tuple | None = None):
    """The jax `Lowered` for --what, from abstract inputs; dtypes (param, compute) overrides --dtype's."""
    import jax
    import jax.numpy as jnp

    import grpo
    import model
    from grpo.logprobs import make_step_logprobs

    dtype, compute_dtype = dtypes or _dtypes()
    lcfg = lora_config(cfg)
    shape = (FLAGS.batch, FLAGS.seq_len)
    if what == "forward":
        fwd = jax.jit(model.forward, static_argnums=2, static_argnames="remat")
        return fwd.lower(model.abstract_params(cfg, dtype), jax.ShapeDtypeStruct(shape, jnp.int32), cfg,
                         attention_mask=jax.ShapeDtypeStruct(shape, jnp.int32))
    axes = cli.parse_mesh(FLAGS.mesh)
    mesh = grpo.make_mesh(data=axes["data"], fsdp=axes["fsdp"])
    gcfg = grpo.GRPOConfig(num_micro_batches=FLAGS.num_micro_batches, remat=FLAGS.remat, beta=FLAGS.beta,
                           logits_chunk=FLAGS.logits_chunk, compute_dtype=compute_dtype,
                           logprob_tail=FLAGS.logprob_tail, num_generations=FLAGS.num_generations,
                           shared_prompt=FLAGS.shared_prompt)
    keys = ("old_logprobs", "ref_logprobs") if FLAGS.beta else ("old_logprobs",)
    args = grpo.abstract_step_args(cfg, gcfg, mesh, *shape, lora_cfg=lcfg, param_dtype=dtype, optional_keys=keys)
    if what == "step":
        return grpo.make_any_step(cfg, gcfg, mesh, lcfg).lower(*args)
    fn = make_step_logprobs(cfg, gcfg, mesh, lora_cfg=lcfg)  # the old-policy / reference pass of this step
    rows = (args[2]["tokens"], args[2]["attention_mask"])
    return fn.lower(args[0], *rows) if lcfg is None else fn.lower(args[3], args[0], *rows)


def _size(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if n >= GIB else f"{n / MIB:9.3f} MiB"


def numbers(cfg, compiled, devices: int) -> dict:
    """Every number the report prints, by name (bytes are per device)."""
    from model.lora import num_adapter_params

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    lcfg = lora_config(cfg)
    lora = lcfg is not None and FLAGS.what != "forward"
    out = {
        "preset": cfg.name, "params": cfg.num_params(), "dtype": FLAGS.dtype, "what": FLAGS.what,
        "batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "devices": devices,
        "mesh": FLAGS.mesh if FLAGS.what != "forward" else None,
        "num_micro_batches": FLAGS.num_micro_batches, "remat": FLAGS.remat, "compute_dtype": _dtypes()[1],
        "lora_rank": lcfg.rank if lora else 0, "lora_alpha": lcfg.alpha if lora else None,
        "lora_targets": list(lcfg.targets) if lora else None,
        "adapter_params": num_adapter_params(cfg, lcfg) if lora else 0,
        "cost_analysis_flops_per_device": float(cost.get("flops", float("nan"))),
        "analytic_flops_per_device": analytic_flops(cfg, FLAGS.batch, FLAGS.seq_len, FLAGS.what, FLAGS.remat,
                                                    lora) / devices,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
    }
    out["peak_bytes_per_device"] = cli.compiled_peak_bytes(compiled)
    return out


def report(n: dict) -> str:
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
                  f"  step     {_size(n['peak_bytes_per_device'])}  fits: {n['step_fits']}",
                  f"  rollout  {_size(n['rollout_bytes_per_device'])}  fits: {n['rollout_fits']} "
                  f"({n['rollout_rows']} rows per sampler call; upper bound, see bin/machines.py)",
                  f"fits: {n['fits']}"]
    if "accelerator_estimate_bytes" in n:
        lines += [f"  float32 program's temporaries {_size(n['float32_temp_bytes'])}",
                  f"  accelerator ~ {_size(n['accelerator_estimate_bytes'])} (peak with the float32 program's "
                  f"temporaries: no XLA:CPU float32 copies of bf16 weights; activations sized as float32)"]
    return "\n".join(lines)


def accelerator_estimate(cfg, n: dict) -> dict:
    """XLA:CPU computes bf16 work in float32 and, for dynamic-slice (the layer scan), converts the WHOLE bf16
    weight stack to float32 and hoists it out of the loops: a float32 copy of the weights that a TPU or GPU
    never makes. Compiling the same program with float32 weights has no such copies and sizes every activation
    as float32 (an accelerator's bf16 ones are half), so bf16 arguments + its temporaries is a conservative
    estimate of the accelerator's peak."""
    import jax.numpy as jnp

    compiled = lower(cfg, FLAGS.what, dtypes=(jnp.float32, None)).compile()
    temp32 = compiled.memory_analysis().temp_size_in_bytes
    return {"float32_temp_bytes": temp32, "accelerator_estimate_bytes": n["peak_bytes_per_device"]
            - n["temp_bytes"] + temp32}


def stored_bytes_per_device(cfg, dtype, shards: int, lora: bool) -> int:
    """What the step keeps between steps on one device: params as stored (FSDP-split), plus for full fine-tuning
    the two float32 Adam moments (and a reference copy when --beta > 0); LoRA's adapters are a rounding error."""
    import numpy as np

    stored = cfg.num_params() * np.dtype(dtype).itemsize
    if not lora:
        stored += cfg.num_params() * 8 + (stored if FLAGS.beta else 0)
    return stored // shards


def machine_check(cfg, machine, devices: int) -> dict:
    """The machine's fit: the step compiled with float32 compute (no XLA:CPU bf16 copies; activations sized as
    float32, at least an accelerator's bf16 ones), its parameter arguments counted at the machine's storage
    dtype; plus the rollout's upper bound (bin/machines.py `rollout_bytes`) at the machine's rollout rows."""
    import jax.numpy as jnp
    import numpy as np

    dtype, compute_dtype = _dtypes()
    compiled = lower(cfg, FLAGS.what, dtypes=(jnp.float32, None)).compile()
    n = numbers(cfg, compiled, devices)
    lora = n["lora_rank"] > 0
    shards = cli.parse_mesh(FLAGS.mesh)["fsdp"]
    if np.dtype(dtype).itemsize < 4:  # bf16 storage: the compiled float32 params are twice the real ones
        n["peak_bytes_per_device"] -= cfg.num_params() * (4 - np.dtype(dtype).itemsize) // shards * (
            1 + int(bool(FLAGS.beta) and not lora))
    seq = FLAGS.seq_len
    new_tokens = FLAGS.max_new_tokens or max(1, seq - machines.PROMPT_TOKENS)
    rollout_rows = FLAGS.rollout_batch_size or min(machine.rollout_rows, FLAGS.batch)
    sample_bytes = 2 if (compute_dtype == "bfloat16" or np.dtype(dtype).itemsize == 2) else 4
    rollout = machines.rollout_bytes(cfg, rollout_rows, min(seq, machines.PROMPT_TOKENS + new_tokens),
                                     sample_dtype_bytes=sample_bytes,
                                     stored_bytes_per_device=stored_bytes_per_device(cfg, dtype, shards, lora))
    n.update({
        "machine": machine.name, "dtype": FLAGS.dtype, "compute_dtype": compute_dtype,
        "compiled_as": "float32 compute (an upper bound for bfloat16 compute), params counted as stored",
        "device_bytes": machine.device_bytes(), "fit_fraction": machines.FIT_FRACTION,
        "rollout_rows": rollout_rows, "rollout_bytes_per_device": rollout,
        "step_fits": machines.fits(n["peak_bytes_per_device"], machine),
        "rollout_fits": machines.fits(rollout, machine),
    })
    n["fits"] = n["step_fits"] and n["rollout_fits"]
    return n


def main(argv):
    cli.no_extra_args(argv)
    for name in ("batch", "seq_len", "num_micro_batches", "logits_chunk", "num_generations"):
        if getattr(FLAGS, name) < 1:
            raise FlagError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.logprob_tail is not None and not 1 <= FLAGS.logprob_tail < FLAGS.seq_len:
        raise FlagError(f"--logprob_tail must be in 1..{FLAGS.seq_len - 1} (--seq_len - 1), got {FLAGS.logprob_tail}")
    if FLAGS.lora_rank and FLAGS.what == "forward":
        raise FlagError("--lora_rank applies to --what logprobs or step, not forward")
    if FLAGS.accelerator_estimate and (FLAGS.dtype != "bfloat16" or FLAGS.compute_dtype or FLAGS.platform != "cpu"):
        raise FlagError("--accelerator_estimate needs --dtype bfloat16 (no --compute_dtype) on --platform cpu")
    machine = machines.get(FLAGS.machine) if FLAGS.machine else None
    if machine:
        if FLAGS.what == "forward" or FLAGS.accelerator_estimate or FLAGS.platform != "cpu":
            raise FlagError("--machine: needs --what step or logprobs, on --platform cpu, without "
                            "--accelerator_estimate (a machine's check is its own estimate)")
        machines.apply(FLAGS, machine, machine.inspect_flags())
    axes = cli.parse_mesh(FLAGS.mesh)
    devices = 1 if FLAGS.what == "forward" else axes["data"] * axes["fsdp"]
    if machine and machine.devices is not None and devices != machine.devices:
        raise FlagError(f"--mesh: {FLAGS.mesh} uses {devices} devices; {machine.name} has {machine.devices}")
    cli.set_fake_cpu_devices(devices, FLAGS.platform)
    from model.forward import compiling_for_accelerator

    # An accelerator's estimate traces the accelerator's program: without the XLA:CPU-only layout choices.
    for_accelerator = FLAGS.accelerator_estimate or (machine is not None and machine.platform != "cpu")
    with compiling_for_accelerator() if for_accelerator else contextlib.nullcontext():
        try:
            cfg = model_config(FLAGS.preset)
            if machine:
                n = machine_check(cfg, machine, devices)
                lowered = None
            else:
                lowered = lower(cfg, FLAGS.what)
        except ValueError as e:  # bad preset or batch shape: one line, not a traceback
            raise FlagError(str(e)) from None
        if lowered is not None:
            compiled = lowered.compile()
            n = numbers(cfg, compiled, devices)
            if FLAGS.accelerator_estimate:
                n.update(accelerator_estimate(cfg, n))
        else:
            compiled = None
    if FLAGS.stablehlo and lowered is not None:
        print(lowered.as_text())
    if FLAGS.dump_hlo and lowered is not None:
        out = Path(FLAGS.dump_hlo)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{FLAGS.what}.stablehlo.mlir").write_text(lowered.as_text())
        (out / f"{FLAGS.what}.optimized.hlo.txt").write_text(compiled.as_text())
        print(f"wrote {out / FLAGS.what}.stablehlo.mlir and .optimized.hlo.txt")
    print(report(n))
    if FLAGS.json:
        print(json.dumps(n))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
