"""Time one GRPO training step on the 270M model, and HF transformers' step on the same rows (--compare_hf).

    bin/bench_train                              # embedded Gemma 3 270M, 16 rows x 288 tokens, float32
    bin/bench_train --repeats 3 --tails completion --compare_hf --json   # BUILD.md's "Training-step speed"
    bin/bench_train --random --rows 16 --prompt_len 160 --completion_len 128 --remat

Log-probs on every position (`--tails 0`) and/or on the completion tail only (`completion`, what bin/train does);
--noshared_prompt runs every row whole, as HF's step does. The batch, the timing and the memory check made before
any weight loads: grpo/train_bench.py. `--json` adds one JSON object on the last line:
{"tails": {"completion": {"step_s": ...}, "0": {...}}, "hf": {...}, ...}.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags

import grpo
import model
from bin import cli
from grpo import profile_ops, train_bench
from model.config import named_config

F = flags.FLAGS
cli.define_model_dir_flag()
flags.DEFINE_bool("random", False, "Random weights of --preset instead of a checkpoint (implied by --preset).")
flags.DEFINE_string("preset", "gemma3-270m", "Model preset for --random (model.PRESETS, or tiny-gemma2 / tiny-gemma3).")
flags.DEFINE_integer("rows", 16, "Batch rows.")
flags.DEFINE_integer("prompt_len", 160, "Prompt tokens per row (left part).")
flags.DEFINE_integer("completion_len", 128, "Completion tokens per row (the tail).")
flags.DEFINE_bool("remat", False, "Rematerialise layers in the backward pass.")
flags.DEFINE_bool("fused_unembed", True, "The loss's unembedding gradient made in the forward pass (GRPOConfig."
                  "fused_unembed); --nofused_unembed times the autodiff path through checkpointed chunks.")
flags.DEFINE_integer("num_generations", 4, "Rows per prompt (GRPO's G): each group of this many rows shares its "
                     "prompt columns, as in a GRPO batch (4 prompts x 4 at 16 rows).")
flags.DEFINE_bool("shared_prompt", True, "Run each group's prompt once in the step (GRPOConfig.shared_prompt, "
                  "what bin/train does); --noshared_prompt runs every row whole.")
flags.DEFINE_integer("repeats", 3, "Timed steps.")
flags.DEFINE_list("tails", list(train_bench.TAILS), "Log-prob tails to time: 0 = all positions, completion = tail.")
flags.DEFINE_bool("json", False, "Print one JSON object with every timing on the last line of stdout.")
flags.DEFINE_string("profile_dir", None, "Trace the timed steps with jax.profiler into <dir>/<tail>/ and print the "
                    "top ops by time (bin/profile_ops.py), with the compiled HLO saved beside as step.hlo.txt.")
flags.DEFINE_bool("compare_hf", False, "Then time HF transformers' step on the same shape in the same invocation "
                  "(tests/bench_hf_train.py; needs the reference extra) and print the ratio.")
JSON_FLAGS = ("rows", "prompt_len", "completion_len", "remat", "fused_unembed", "num_generations", "shared_prompt")


def _check_flags() -> None:
    cli.check_at_least(1, "rows", "prompt_len", "completion_len", "repeats", "num_generations")
    if F.rows % F.num_generations:
        raise cli.FlagError(f"--rows ({F.rows}) must be a multiple of --num_generations ({F.num_generations})")
    if F.compare_hf and F.random:
        raise cli.FlagError("--compare_hf: needs a checkpoint both sides can load (drop --random)")
    with cli.flag_errors():  # the message names the flag
        train_bench.check_tails(F.tails, F.compare_hf)


def _model_config():
    """(model dir or None with --random, the model's config)."""
    if not F.random:
        model_dir = cli.resolve_model_dir(F.model_dir)
        return model_dir, cli.load_model_config(model_dir)
    with cli.flag_errors("--preset: "):
        return None, named_config(F.preset)


def _compile_steps(model_cfg, shape, mesh) -> tuple[dict, dict]:
    """Each tail's GRPOConfig and step compiled from abstract shapes, refused (one line) if it cannot fit."""
    configs = {tail: grpo.GRPOConfig(num_generations=F.num_generations, learning_rate=1e-6, remat=F.remat,
                                     fused_unembed=F.fused_unembed, shared_prompt=F.shared_prompt,
                                     entropy_control=None,
                                     logprob_tail=None if tail == "0" else F.completion_len) for tail in F.tails}
    with cli.flag_errors():
        return configs, {tail: train_bench.compile_step(model_cfg, cfg, mesh, shape, f"tail {tail}")
                         for tail, cfg in configs.items()}


def _compare_hf(model_dir, results: dict) -> dict:
    same = ("rows", "prompt_len", "completion_len", "repeats", "num_generations")  # the script's flags of ours
    hf = cli.run_reference_script("bench_hf_train.py", "--model_dir", str(model_dir),
                                  *[arg for name in same for arg in (f"--{name}", str(F[name].value))])
    print(train_bench.compare_to_hf(results["completion"], hf))
    return hf


def main(argv):
    cli.no_extra_args(argv)
    cli.expand_user("profile_dir")
    F.random = F.random or F["preset"].present  # a preset's random weights: a checkpoint has its own config
    _check_flags()
    model_dir, model_cfg = _model_config()
    if F.profile_dir is not None:  # last of the checks: it makes the directory
        cli.check_writable_dir("profile_dir", F.profile_dir)
    shape = train_bench.StepShape(F.rows, F.prompt_len, F.completion_len, F.num_generations)
    mesh = grpo.make_mesh(data=1, fsdp=len(jax.devices()))
    configs, steps = _compile_steps(model_cfg, shape, mesh)
    if F.random:
        params = model.init_params(jax.random.key(0), model_cfg)
    else:
        model_cfg, params = cli.load_model(model_dir, jnp.float32)
    batch = train_bench.grpo_batch(model_cfg, shape, mesh)
    print(f"{model_cfg.name}: {F.rows} rows x {shape.length} tokens ({F.completion_len} completion), remat={F.remat}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}, G {F.num_generations}, shared prompt {F.shared_prompt}")
    results = {}
    for tail in F.tails:
        trace = None if F.profile_dir is None else Path(F.profile_dir) / tail
        r = train_bench.time_step(steps[tail], params, model_cfg, configs[tail], mesh, batch, F.repeats, trace)
        if trace is not None:
            print(f"profile of {F.repeats} step(s), tail {tail}, in {trace}:")
            print(profile_ops.summary(profile_ops.top_ops(trace), profile_ops.scope_names(steps[tail].as_text())))
        label = "all positions" if tail == "0" else f"tail {F.completion_len}"
        print(f"log-probs on {label:14s}: step {r['step_s']:6.2f} s median of {F.repeats} "
              f"({r['tokens_per_s']:6.1f} tokens/s; first step {r['first_step_s']:.1f} s)")
        results[tail] = r
    out = {"model": model_cfg.name, **{k: F[k].value for k in JSON_FLAGS}, "tails": results}
    if F.compare_hf:
        del params
        out["hf"] = _compare_hf(model_dir, results)
    if F.json:
        print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main)
