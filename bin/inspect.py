"""Lower and compile forward / logprobs / the GRPO step for a preset with abstract shapes; print FLOPs and memory.

    bin/inspect --preset gemma2-2b --what step --batch 64 --seq_len 1024 --mesh data=1,fsdp=8 \\
        --num_micro_batches 8 --remat --dtype float32
    bin/inspect --preset gemma2-2b --what step --batch 16 --seq_len 1024 --mesh data=1,fsdp=1 \\
        --lora_rank 16 --num_micro_batches 4 --remat --dtype bfloat16 --json

`forward` compiles on one device; `logprobs` (the sharded old/ref pass) and `step` on a data x fsdp mesh of fake
CPU devices (made here, before JAX starts a backend), so a laptop can check whether a TPU v3-8 layout fits in
16 GiB per core; --lora_rank > 0: the LoRA step and pass. --json adds one JSON object with every number on the
last line of stdout. The programs and how each number is made: grpo/program_inspect.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from absl import flags

from bin import cli
from grpo import presets, program_inspect, sharding
from model.config import named_config
from model.forward import compiling_for_accelerator

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
flags.DEFINE_string("machine", None, "A machine preset (grpo/presets.py): its mesh, dtype, micro-batches, remat, "
                    "LoRA rank and checked batch shape (explicit flags win); adds device_bytes, the rollout's "
                    "estimate and fits.")
flags.DEFINE_integer("rollout_batch_size", None, "With --machine: rows per sampler call (default: the machine's).")
flags.DEFINE_integer("max_new_tokens", None, "With --machine: completion budget inside --seq_len for the rollout "
                     "estimate (default: --seq_len - 256, TinyZero's prompt budget).")
flags.DEFINE_bool("json", False, "print one JSON object with every reported number as the last line of stdout")
flags.DEFINE_string("dump_hlo", None, "directory to write <what>.stablehlo.mlir and <what>.optimized.hlo.txt")
flags.DEFINE_bool("stablehlo", False, "print the StableHLO text to stdout")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "JAX platform; cpu fakes the devices the mesh needs")


def _check_flags() -> None:
    cli.check_at_least(1, "batch", "seq_len", "num_micro_batches", "logits_chunk", "num_generations")
    if FLAGS.accelerator_estimate and (FLAGS.dtype != "bfloat16" or FLAGS.compute_dtype or FLAGS.platform != "cpu"):
        raise cli.FlagError("--accelerator_estimate needs --dtype bfloat16 (no --compute_dtype) on --platform cpu")


def _machine() -> presets.Machine | None:
    """--machine, its flags applied where the command line set none."""
    if not FLAGS.machine:
        return None
    with cli.flag_errors():
        machine = presets.get_machine(FLAGS.machine)
    if FLAGS.what == "forward" or FLAGS.accelerator_estimate or FLAGS.platform != "cpu" or FLAGS.dump_hlo:
        raise cli.FlagError("--machine: needs --what step or logprobs, on --platform cpu, without "
                            "--accelerator_estimate or --dump_hlo (a machine's check compiles its own stand-in)")
    presets.apply(FLAGS, machine.inspect_flags())
    return machine


def _options(cfg) -> program_inspect.InspectOptions:
    axes = cli.parse_mesh(FLAGS.mesh)
    dtype, compute_dtype = cli.resolve_dtypes(FLAGS.dtype, backend="accelerator")  # as an accelerator resolves it
    return program_inspect.InspectOptions(
        what=FLAGS.what, batch=FLAGS.batch, seq_len=FLAGS.seq_len, mesh=FLAGS.mesh, data=axes["data"],
        fsdp=axes["fsdp"], dtype=FLAGS.dtype, param_dtype=dtype, compute_dtype=FLAGS.compute_dtype or compute_dtype,
        lora_cfg=cli.lora_config(cfg), num_micro_batches=FLAGS.num_micro_batches, remat=FLAGS.remat,
        beta=FLAGS.beta, num_generations=FLAGS.num_generations, shared_prompt=FLAGS.shared_prompt,
        logits_chunk=FLAGS.logits_chunk, logprob_tail=FLAGS.logprob_tail)


def _dump(lowered, compiled) -> None:
    if FLAGS.stablehlo:
        print(lowered.as_text())
    if FLAGS.dump_hlo:
        program_inspect.dump_hlo(lowered, compiled, Path(FLAGS.dump_hlo), FLAGS.what)
        print(f"wrote {Path(FLAGS.dump_hlo) / FLAGS.what}.stablehlo.mlir and .optimized.hlo.txt")


def main(argv):
    cli.no_extra_args(argv)
    cli.expand_user("dump_hlo")
    _check_flags()
    machine = _machine()
    axes = cli.parse_mesh(FLAGS.mesh)
    devices = 1 if FLAGS.what == "forward" else axes["data"] * axes["fsdp"]
    if machine and machine.devices is not None and devices != machine.devices:
        raise cli.FlagError(f"--mesh: {FLAGS.mesh} uses {devices} devices; {machine.name} has {machine.devices}")
    with cli.flag_errors("--preset: "):
        cfg = named_config(FLAGS.preset)
    with cli.flag_errors():  # the messages name the flag (the batch against the mesh among them)
        opts = _options(cfg)
    if FLAGS.dump_hlo:  # last of the checks (it makes the directory), before anything lowers
        cli.check_writable_dir("dump_hlo", FLAGS.dump_hlo)
    sharding.set_fake_cpu_devices(devices, FLAGS.platform)  # before JAX starts a backend
    # An accelerator's estimate traces the accelerator's program: without the XLA:CPU-only layout choices.
    for_accelerator = FLAGS.accelerator_estimate or (machine is not None and machine.platform != "cpu")
    with compiling_for_accelerator() if for_accelerator else contextlib.nullcontext(), cli.flag_errors():
        program_inspect.check_platform(FLAGS.platform)  # first use of the backend: --platform gpu without one
        if machine:
            n = program_inspect.machine_check(cfg, opts, machine, FLAGS.rollout_batch_size, FLAGS.max_new_tokens)
        else:
            lowered, compiled, n = program_inspect.measure(cfg, opts, FLAGS.accelerator_estimate)
            _dump(lowered, compiled)
    print(program_inspect.report(n))
    if FLAGS.json:
        print(json.dumps(n))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
