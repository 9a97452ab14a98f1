"""Sampled pass@k of a checkpoint on every level's held-out puzzles: where a difficulty ladder should start.

    bin/pass_at_k --curriculum countdown --k 8 --eval_size 16            # the embedded Gemma 3 270M
    bin/pass_at_k --model_dir runs/laptop/final_hf --curriculum countdown

Prints, per level: pass@1 (the mean solved rate of the samples), pass@k (puzzles solved at least once in k
samples), the format rate and the mean reward, then one JSON object on the last line. Same prompts, held-out
sets, stop rule and token budget as bin/train with the same flags.
"""

from __future__ import annotations

import json

from absl import flags

from bin import cli

F = flags.FLAGS
cli.define_model_dir_flag()
cli.define_tokenizer_flag()
flags.DEFINE_string("curriculum", "countdown", "Ladder whose levels to measure (data/curriculum.py), or off.")
flags.DEFINE_list("levels", None, "Only these levels of the ladder (names; default: all).")
flags.DEFINE_integer("k", 8, "Samples per puzzle.")
flags.DEFINE_integer("eval_size", 16, "Held-out puzzles per level.")
flags.DEFINE_integer("max_new_tokens", 64, "Completion budget.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_bool("stop_at_answer", True, "Stop a completion once its text has produced </answer>.")
flags.DEFINE_enum("template", "base", ["base", "chat"], "Prompt template.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
cli.define_think_flags()


def main(argv):
    cli.no_extra_args(argv)
    cli.check_at_least(1, "k", "eval_size", "max_new_tokens")
    think = cli.think_budget(F.max_new_tokens)
    import jax
    import jax.numpy as jnp

    from data import curriculum
    from grpo.evaluation import pass_at_k, task_think_forcing
    from grpo.rollout import RolloutConfig
    from grpo.tasks import CountdownTask
    from model.sampler import check_fits
    from model.sampling import SamplingConfig

    with cli.flag_errors("--curriculum: "):
        levels = curriculum.ladder(F.curriculum)
    if F.levels is not None and not F.levels or set(F.levels or ()) - {lv.name for lv in levels}:
        raise cli.FlagError(f"--levels: {F.levels} are not all among {', '.join(lv.name for lv in levels)}")
    levels = tuple(lv for lv in levels if not F.levels or lv.name in F.levels)  # held-out sets as with all
    with cli.flag_errors("--"):  # the config names the field, which is the flag's name
        sampling = SamplingConfig(temperature=F.temperature)
    if F.temperature == 0 and F.k > 1:  # pass@k would be pass@1, at k times the cost
        raise cli.FlagError(f"--k {F.k} with --temperature 0: greedy draws one completion k times; use --k 1")
    with cli.flag_errors("--eval_size: "):  # a level may hold fewer puzzles (make_splits' num_test)
        splits = [curriculum.level_splits(lv, 1, F.eval_size, 0) for lv in levels]
    model_dir = cli.resolve_model_dir(F.model_dir)
    tok = cli.load_tokenizer(F.tokenizer, model_dir, config := cli.load_model_config(model_dir))
    task = CountdownTask(train=[t for t, _ in splits], test=[h for _, h in splits], tokenizer=tok,
                         template=F.template, levels=levels)
    with cli.flag_errors():  # the longest prompt and the budget must fit the sampler's cache, the wait text be
        check_fits(max(len(task.encode_prompt(it)) for i in range(len(levels)) for it in task.eval_items(i)),
                   F.max_new_tokens)  # tokens: before the weights load
        task_think_forcing(task, think, config.vocab_size)
    model_cfg, params = cli.load_model(model_dir, jnp.float32)
    rollout_cfg = RolloutConfig(max_new_tokens=F.max_new_tokens, sampling=sampling, stop_at_answer=F.stop_at_answer)
    out = {}
    for i, level in enumerate(levels):
        r = pass_at_k(params, model_cfg, task, task.eval_items(i), F.k, rollout_cfg,
                      jax.random.fold_in(jax.random.key(F.seed), i), think=think)  # each level its own draws
        print(f"{level.name:10s} pass@1 {r['pass@1']:.3f}  pass@{F.k} {r[f'pass@{F.k}']:.3f}  "
              f"format {r['format']:.3f}  reward {r['reward']:.3f}   e.g. {r['samples'][0][-80:]!r}", flush=True)
        out[level.name] = {k: v for k, v in r.items() if k != "samples"}
    print(json.dumps({"model_dir": str(model_dir), "k": F.k, "eval_size": F.eval_size, "levels": out}))


if __name__ == "__main__":
    cli.run(main)
