"""Time the WHOLE GRPO step phase by phase, with the trainer's own phases (grpo/grpo_bench.py). Default shape: our
Tunix measurement's, 4 prompts x 4 completions, 64 new tokens, beta 0.04, full fine-tuning, the embedded Gemma 3
270M, float32; --prompts / --num_generations / --max_new_tokens set TinyZero's or any other.

    bin/bench_grpo                       # median of 3 timed steps after one warm-up step (compiles)
    bin/bench_grpo --json                # + one JSON object on the last line
    bin/bench_grpo --prompts 128 --num_generations 5 --max_new_tokens 1024 --machine auto    # TinyZero's shape
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from bin import cli

F = flags.FLAGS
cli.define_model_dir_flag()
flags.DEFINE_integer("prompts", 4, "Prompts per step.")
flags.DEFINE_integer("num_generations", 4, "Completions per prompt (G).")
flags.DEFINE_integer("max_new_tokens", 64, "Completion budget.")
flags.DEFINE_float("beta", 0.04, "KL coefficient (> 0: the reference pass runs).")
flags.DEFINE_bool("stop_at_answer", False, "Stop rollouts at </answer> (bin/train's default; Tunix did not).")
flags.DEFINE_bool("remat", False, "Rematerialise layers in the backward pass.")
flags.DEFINE_bool("shared_prompt", True, "Each group's prompt run once in the reference pass and the update "
                  "(bin/train's default); --noshared_prompt runs every row whole.")
flags.DEFINE_integer("repeats", 3, "Timed steps (after one warm-up step).")
flags.DEFINE_bool("json", False, "Print one JSON object with every timing on the last line of stdout.")
flags.DEFINE_string("machine", None, "A machine (grpo/presets.py) or auto: its remat, bf16 compute off-CPU, and the "
                    "micro-batches and rollout rows its plan gives this model and shape (grpo/planner.py).")
flags.DEFINE_integer("num_micro_batches", 1, "Gradient-accumulation micro-batches (with --machine: kept if it fits).")
flags.DEFINE_integer("rollout_batch_size", 0, "Rows per sampler call, 0: all (with --machine: kept if it fits).")
JSON_FLAGS = ("prompts", "num_generations", "max_new_tokens", "beta", "remat", "shared_prompt", "stop_at_answer",
              "machine", "num_micro_batches", "rollout_batch_size")


def main(argv):
    cli.no_extra_args(argv)
    cli.check_at_least(1, "prompts", "max_new_tokens", "repeats", "num_micro_batches")
    cli.check_at_least(0, "rollout_batch_size")
    cli.check_at_least(2, "num_generations")
    import jax
    import jax.numpy as jnp

    import grpo
    from grpo import grpo_bench, presets

    if F.machine:  # as bin/train: a planned run takes GPU_MEM_FRACTION of a GPU, before JAX starts a backend
        presets.claim_gpu_memory()

    bench = grpo_bench.BenchConfig(**{f.name: F[f.name].value for f in dataclasses.fields(grpo_bench.BenchConfig)
                                      if f.name in F})
    model_dir = cli.resolve_model_dir(F.model_dir)
    model_cfg = cli.load_model_config(model_dir)
    with cli.flag_errors():  # the configs, the tokenizer, and the prompts + --max_new_tokens against the cache
        tok = grpo_bench.load_tokenizer(model_dir, model_cfg, bench, len(jax.devices()))
    mesh = grpo.make_mesh(data=1, fsdp=len(jax.devices()))
    if F.machine:
        from grpo import planner

        given = {k: F[k].value for k in ("num_micro_batches", "rollout_batch_size", "remat") if F[k].present}
        with cli.flag_errors():
            machine = planner.resolve_machine(F.machine, jax.devices())
            bench, plan = grpo_bench.planned(bench, machine, model_cfg, tok, mesh, given)
        F.remat, F.num_micro_batches, F.rollout_batch_size = bench.remat, plan.num_micro_batches, plan.rollout_rows
        print(f"machine {machine.name}: compute {bench.compute_dtype or 'float32'}; plan: {plan.describe()}")
    model_cfg, params = cli.load_model(model_dir, jnp.float32)  # after every check and the plan
    print(f"{model_cfg.name}: {F.prompts} prompts x {F.num_generations} completions, {F.max_new_tokens} new tokens, "
          f"beta {F.beta}, full fine-tuning, remat={F.remat}, {jax.device_count()} x {jax.devices()[0].platform}")
    echo = lambda i, row: print(("warm-up" if i == 0 else f"step {i}") + ": " + grpo_bench.format_row(row))
    timings = grpo_bench.run_bench(model_cfg, params, tok, bench, mesh, echo)
    median = grpo_bench.medians(timings)
    print("median: " + grpo_bench.format_row(median))
    if F.json:
        print(json.dumps({"model": model_cfg.name, **{k: F[k].value for k in JSON_FLAGS},
                          "devices": jax.device_count(), "median": median, "steps": timings}))


if __name__ == "__main__":
    cli.run(main)
