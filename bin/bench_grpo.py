"""Time the WHOLE GRPO step (rollout + reference pass + update) on the configuration of our Tunix measurement:
4 prompts x 4 completions, 64 new tokens, beta 0.04, full fine-tuning, the embedded Gemma 3 270M, float32.

    bin/bench_grpo                       # median of 3 timed steps after one warm-up step (compiles)
    bin/bench_grpo --json                # + one JSON object on the last line

Each step is what bin/train does, phase by phase, with the trainer's own functions: `sample_groups` (TinyZero
puzzles, base template, temperature 1; rollouts run the whole budget unless --stop_at_answer, as Tunix's did),
the reference log-probs (`make_step_logprobs`: the step's own precision), and the jitted `step` (AdamW).
Reported per phase: rollout / reference / update seconds, and their sum.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from bin import cli
from bin.cli import FlagError

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


def main(argv):
    cli.no_extra_args(argv)
    for name in ("prompts", "max_new_tokens", "repeats"):
        if F[name].value < 1:
            raise FlagError(f"--{name} must be >= 1, got {F[name].value}")
    if F.num_generations < 2:
        raise FlagError(f"--num_generations must be >= 2, got {F.num_generations}")
    import jax
    import jax.numpy as jnp

    import grpo
    from data import puzzles
    from grpo.rollout import RolloutConfig, align_grpo_config, sample_groups
    from grpo.tasks import CountdownTask
    from grpo.trainer import _compiled_fns
    from model.sampling import SamplingConfig

    model_dir = cli.resolve_model_dir(F.model_dir)
    model_cfg, params = cli.load_model(model_dir, jnp.float32)
    tok = cli.load_tokenizer(None, model_dir, model_cfg)
    train, test = puzzles.make_splits(F.prompts * (F.repeats + 1), 1, 0)
    task = CountdownTask(train=[train], test=[test], tokenizer=tok)
    rollout_cfg = RolloutConfig(max_new_tokens=F.max_new_tokens, sampling=SamplingConfig(temperature=1.0),
                                stop_at_answer=F.stop_at_answer)
    grpo_cfg = align_grpo_config(grpo.GRPOConfig(num_generations=F.num_generations, beta=F.beta,
                                                 learning_rate=1e-6, remat=F.remat,
                                                 shared_prompt=F.shared_prompt), rollout_cfg)
    mesh = grpo.make_mesh(data=1, fsdp=len(jax.devices()))
    step_fn, ref_fn, _ = _compiled_fns(model_cfg, grpo_cfg, None, mesh)
    params, opt = grpo.init_train_state(params, model_cfg, grpo_cfg, mesh)
    ref_params = jax.tree.map(jnp.copy, params) if F.beta > 0 else None
    print(f"{model_cfg.name}: {F.prompts} prompts x {F.num_generations} completions, {F.max_new_tokens} new tokens, "
          f"beta {F.beta}, full fine-tuning, remat={F.remat}, {jax.device_count()} x {jax.devices()[0].platform}")
    timings = []
    for i in range(F.repeats + 1):
        t0 = time.perf_counter()
        items = task.train_items(i * F.prompts, F.prompts)
        rollout = sample_groups(params, model_cfg, task, items, F.num_generations, rollout_cfg,
                                jax.random.key(i), grpo_cfg.scale_rewards)
        t1 = time.perf_counter()
        batch = {k: jnp.asarray(v) for k, v in rollout.batch.items()}
        if ref_params is not None:
            batch["ref_logprobs"] = jax.block_until_ready(ref_fn(ref_params, batch["tokens"], batch["attention_mask"]))
        t2 = time.perf_counter()
        params, opt, metrics = step_fn(params, opt, batch)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        row = {"rollout_s": t1 - t0, "reference_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0,
               "completion_tokens": int(rollout.lengths.sum())}
        print(("warm-up" if i == 0 else f"step {i}") + ": " +
              ", ".join(f"{k} {v:.2f}" if k.endswith("_s") else f"{k} {v}" for k, v in row.items()))
        if i:
            timings.append(row)
    median = {k: statistics.median(t[k] for t in timings) for k in ("rollout_s", "reference_s", "update_s",
                                                                       "total_s")}
    print("median: " + ", ".join(f"{k} {v:.2f} s" for k, v in median.items()))
    if F.json:
        print(json.dumps({"model": model_cfg.name, "prompts": F.prompts, "num_generations": F.num_generations,
                          "max_new_tokens": F.max_new_tokens, "beta": F.beta, "remat": F.remat,
                          "median": median, "steps": timings}))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
