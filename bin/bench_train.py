"""Time one GRPO training step on the 270M model, and HF transformers' step on the same rows (--compare_hf).

    bin/bench_train                              # embedded Gemma 3 270M, 16 rows x 288 tokens, float32
    bin/bench_train --repeats 3 --tails completion --compare_hf --json   # BUILD.md's "Training-step speed"
    bin/bench_train --random --rows 16 --prompt_len 160 --completion_len 128 --remat

The batch is GRPO-shaped: groups of --num_generations rows (4 prompts x 4 at 16 rows) with the same prompt
columns, and by default the step runs each group's prompt once (GRPOConfig.shared_prompt, what bin/train does;
--noshared_prompt runs every row whole, as HF's step does). Median of --repeats timed steps after one warm-up
(compile) step, with log-probs on every position (`--tails 0`) and/or on the completion tail only (`completion`,
what bin/train does). `--json` adds one JSON object on the last line:
{"tails": {"completion": {"step_s": ...}, "0": {...}}, "hf": {...}, ...}.

Before any weight is loaded, each step is compiled from abstract shapes and XLA's memory analysis (params,
gradients, Adam state, activations) is compared with the memory available: a shape that cannot fit is one
line naming the flags, not an OOM kill.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from absl import flags

from bin import cli, profile_ops
from bin.cli import FlagError

F = flags.FLAGS
cli.define_model_dir_flag()
flags.DEFINE_bool("random", False, "Random weights of --preset instead of a checkpoint.")
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
flags.DEFINE_list("tails", ["0", "completion"], "Log-prob tails to time: 0 = all positions, completion = tail.")
flags.DEFINE_bool("json", False, "Print one JSON object with every timing on the last line of stdout.")
flags.DEFINE_string("profile_dir", None, "Trace the timed steps with jax.profiler into <dir>/<tail>/ and print the "
                    "top ops by time (bin/profile_ops.py), with the compiled HLO saved beside as step.hlo.txt.")
flags.DEFINE_bool("compare_hf", False, "Then time HF transformers' step on the same shape in the same invocation "
                  "(tests/bench_hf_train.py; needs the reference extra) and print the ratio.")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    import os

    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(peak: int, what: str, flags_named: str) -> None:
    """One line naming the flags when `peak` bytes exceed what this machine has available now."""
    avail = available_bytes()
    if peak > avail:
        raise FlagError(f"{flags_named}: {what} needs about {peak / 2**30:.1f} GiB (XLA's memory analysis) but "
                        f"{avail / 2**30:.1f} GiB is available; use fewer rows / shorter sequences, or --remat")


def main(argv):
    cli.no_extra_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grpo
    import model

    if F.profile_dir is not None:
        cli.check_writable_dir("profile_dir", F.profile_dir)
    for name in ("rows", "prompt_len", "completion_len", "repeats", "num_generations"):
        if F[name].value < 1:
            raise FlagError(f"--{name} must be >= 1, got {F[name].value}")
    if F.rows % F.num_generations:
        raise FlagError(f"--rows ({F.rows}) must be a multiple of --num_generations ({F.num_generations})")
    if F.compare_hf and F.random:
        raise FlagError("--compare_hf: needs a checkpoint both sides can load (drop --random)")
    if F.compare_hf and "completion" not in F.tails:
        raise FlagError("--compare_hf: compares the completion tail; keep 'completion' in --tails")
    if F.random:
        try:
            model_cfg = cli.preset_config(F.preset)
        except ValueError as e:
            raise FlagError(f"--preset: {e}") from None
    else:
        model_dir = cli.resolve_model_dir(F.model_dir)
        model_cfg = cli.load_model_config(model_dir)
    t = F.prompt_len + F.completion_len
    mesh = grpo.make_mesh(data=1, fsdp=len(jax.devices()))
    configs = {tail: grpo.GRPOConfig(num_generations=F.num_generations, learning_rate=1e-6, remat=F.remat,
                                     fused_unembed=F.fused_unembed, shared_prompt=F.shared_prompt,
                                     logprob_tail=None if tail == "0" else F.completion_len) for tail in F.tails}
    compiled = {tail: _compile_step(model_cfg, cfg, mesh, F.rows, t) for tail, cfg in configs.items()}
    for tail, c in compiled.items():
        check_fits(cli.compiled_peak_bytes(c), f"a step of {F.rows} rows x {t} tokens (tail {tail})",
                   "--rows/--prompt_len/--completion_len")
    if F.random:
        params = model.init_params(jax.random.key(0), model_cfg)
    else:
        model_cfg, params = cli.load_model(model_dir, jnp.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, min(1000, model_cfg.vocab_size), (F.rows, t))
    tokens[:, : F.prompt_len] = np.repeat(tokens[:: F.num_generations, : F.prompt_len], F.num_generations, axis=0)
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "attention_mask": jnp.ones((F.rows, t), jnp.int32),
        "completion_mask": jnp.asarray(np.arange(t)[None].repeat(F.rows, 0) >= F.prompt_len, jnp.int32),
        "advantages": jnp.asarray(rng.normal(size=F.rows), jnp.float32),
    }
    batch = {k: jax.device_put(v, jax.NamedSharding(mesh, grpo.sharding.batch_spec(v.ndim))) for k, v in batch.items()}
    print(f"{model_cfg.name}: {F.rows} rows x {t} tokens ({F.completion_len} completion), remat={F.remat}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}, G {F.num_generations}, shared prompt {F.shared_prompt}")
    results = {}
    for tail in F.tails:
        grpo_cfg = configs[tail]
        p, opt = grpo.init_train_state(jax.tree.map(jnp.copy, params), model_cfg, grpo_cfg, mesh)
        step = compiled[tail]
        t0 = time.perf_counter()
        p, opt, m = step(p, opt, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        trace = None if F.profile_dir is None else Path(F.profile_dir) / tail
        if trace is not None:
            trace.mkdir(parents=True, exist_ok=True)
            (trace / "step.hlo.txt").write_text(step.as_text())
            jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
        for _ in range(F.repeats):
            t0 = time.perf_counter()
            p, opt, m = step(p, opt, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        if trace is not None:
            jax.profiler.stop_trace()
            print(f"profile of {F.repeats} step(s), tail {tail}, in {trace}:")
            print(profile_ops.summary(profile_ops.top_ops(trace), profile_ops.scope_names(step.as_text())))
        med = statistics.median(times)
        label = "all positions" if tail == "0" else f"tail {F.completion_len}"
        print(f"log-probs on {label:14s}: step {med:6.2f} s median of {F.repeats} "
              f"({F.rows * t / med:6.1f} tokens/s; first step {compile_s:.1f} s)")
        results[tail] = {"step_s": med, "steps_s": times, "first_step_s": compile_s,
                         "tokens_per_s": F.rows * t / med, "peak_bytes": cli.compiled_peak_bytes(step)}
        del p, opt
    out = {"model": model_cfg.name, "rows": F.rows, "prompt_len": F.prompt_len, "completion_len": F.completion_len,
           "remat": F.remat, "fused_unembed": F.fused_unembed, "num_generations": F.num_generations,
           "shared_prompt": F.shared_prompt, "tails": results}
    if F.compare_hf:
        del params
        out["hf"] = cli.run_reference_script(
            "bench_hf_train.py", "--model_dir", str(model_dir), "--rows", str(F.rows), "--prompt_len",
            str(F.prompt_len), "--completion_len", str(F.completion_len), "--repeats", str(F.repeats),
            "--num_generations", str(F.num_generations))
        for tail, timing in results.items():
            if tail == "completion":
                timing["ratio_to_hf"] = timing["step_s"] / out["hf"]["step_s"]
                print(f"ours / HF (completion tail): {timing['ratio_to_hf']:.2f}x "
                      f"({timing['step_s']:.2f} s vs {out['hf']['step_s']:.2f} s, same invocation)")
    if F.json:
        print(json.dumps(out))


def _compile_step(model_cfg, grpo_cfg, mesh, rows: int, t: int):
    """The step compiled from abstract params, optimizer state and batch (nothing allocated yet)."""
    import grpo

    return grpo.make_step(model_cfg, grpo_cfg, mesh).lower(
        *grpo.abstract_step_args(model_cfg, grpo_cfg, mesh, rows, t)).compile()


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
