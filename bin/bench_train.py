"""Time one GRPO training step on the 270M model: the number to compare with HF transformers' 59.8 s.

    bin/bench_train                              # embedded Gemma 3 270M, 16 rows x 288 tokens, float32
    bin/bench_train --random --rows 16 --prompt_len 160 --completion_len 128 --remat

Median of --repeats timed steps after one warm-up (compile) step, with log-probs on every position
(`--logprob_tail=0`, what a plain HF step computes) and on the completion tail only (what bin/train does).
"""

from __future__ import annotations

import statistics
import time

from absl import flags

from bin import cli

F = flags.FLAGS
cli.define_model_dir_flag()
flags.DEFINE_bool("random", False, "Random weights of the gemma3-270m preset instead of a checkpoint.")
flags.DEFINE_integer("rows", 16, "Batch rows.")
flags.DEFINE_integer("prompt_len", 160, "Prompt tokens per row (left part).")
flags.DEFINE_integer("completion_len", 128, "Completion tokens per row (the tail).")
flags.DEFINE_bool("remat", False, "Rematerialise layers in the backward pass.")
flags.DEFINE_integer("repeats", 3, "Timed steps.")
flags.DEFINE_list("tails", ["0", "completion"], "Log-prob tails to time: 0 = all positions, completion = tail.")


def main(argv):
    cli.no_extra_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grpo
    import model

    if F.random:
        model_cfg = model.get_preset("gemma3-270m")
        params = model.init_params(jax.random.key(0), model_cfg)
    else:
        model_cfg, params = cli.load_model(cli.resolve_model_dir(F.model_dir), jnp.float32)
    t = F.prompt_len + F.completion_len
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(4, 1000, (F.rows, t)), jnp.int32),
        "attention_mask": jnp.ones((F.rows, t), jnp.int32),
        "completion_mask": jnp.asarray(np.arange(t)[None].repeat(F.rows, 0) >= F.prompt_len, jnp.int32),
        "advantages": jnp.asarray(rng.normal(size=F.rows), jnp.float32),
    }
    mesh = grpo.make_mesh(data=1, fsdp=len(jax.devices()))
    print(f"{model_cfg.name}: {F.rows} rows x {t} tokens ({F.completion_len} completion), remat={F.remat}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}")
    for tail in F.tails:
        grpo_cfg = grpo.GRPOConfig(num_generations=2, learning_rate=1e-6, remat=F.remat,
                               logprob_tail=None if tail == "0" else F.completion_len)
        p, opt = grpo.init_train_state(jax.tree.map(jnp.copy, params), model_cfg, grpo_cfg, mesh)
        step = grpo.make_step(model_cfg, grpo_cfg, mesh)
        t0 = time.perf_counter()
        p, opt, m = step(p, opt, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(F.repeats):
            t0 = time.perf_counter()
            p, opt, m = step(p, opt, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        label = "all positions" if tail == "0" else f"tail {F.completion_len}"
        print(f"log-probs on {label:14s}: step {med:6.2f} s median of {F.repeats} "
              f"({F.rows * t / med:6.1f} tokens/s; first step incl. compile {compile_s:.1f} s)")
        del p, opt


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
