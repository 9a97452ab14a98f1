"""Recipes: named sets of bin/train flag defaults (`--recipe NAME`). Explicit flags always win.

A recipe sets algorithm choices (curriculum, group size, learning rate, token budget, ...); the hardware
choices (mesh, dtype, micro-batches, remat) stay with their own flags. `apply` changes only the flags the
command line did not set, before any flag is read, so `--recipe laptop --learning_rate 1e-5` means the laptop
recipe with that learning rate.
"""

from __future__ import annotations

from absl import flags

from bin.cli import FlagError

RECIPES: dict[str, dict[str, object]] = {
    # The 2-core CPU recipe (BUILD.md, "Laptop runs"): the difficulty ladder with the learning mechanisms of the
    # ladder recipe below at CPU size: 6 prompts x 8 completions, 64 new tokens, LoRA rank 16 (bin/train's
    # default; 1e-4 = 10 x 1e-5), remat (without it the 48 x 384 step's activations need ~30 GiB), 15 steps. Dynamic
    # sampling is capped at 2x: each extra round costs a full sampling pass on this box.
    "laptop": {
        "curriculum": "countdown", "shaping": "first_rung", "promote_at": 0.35, "stop_at_answer": True,
        "skip_zero_std_groups": True, "dynamic_sampling": True, "max_oversample": 2.0, "entropy_coef": 0.0,
        "adaptive_entropy": True, "level_mix": True, "prompts_per_step": 6, "num_generations": 8,
        "max_new_tokens": 64, "learning_rate": 1e-5, "steps": 15, "eval_every": 5, "eval_size": 16,
        "checkpoint_every": 5, "remat": True,
    },
    # The ladder on one accelerator (the algorithm; --machine stays the hardware): reward shaping on the first
    # rung only (no fixed answer template pays above it), dynamic sampling up to 3x, an adaptive entropy bonus
    # instead of a fixed one, prompts mixed over the levels up to the frontier, 32 prompts x 8 completions of up
    # to 128 tokens, held-out sets of 64 puzzles per level every 10 steps (32 would be +-0.09 noise).
    "ladder": {
        "curriculum": "countdown", "shaping": "first_rung", "promote_at": 0.35, "stop_at_answer": True,
        "skip_zero_std_groups": True, "dynamic_sampling": True, "max_oversample": 3.0, "entropy_coef": 0.0,
        "adaptive_entropy": True, "level_mix": True, "prompts_per_step": 32, "num_generations": 8,
        "max_new_tokens": 128, "learning_rate": 1e-5, "steps": 300, "eval_every": 10, "eval_size": 64,
        "checkpoint_every": 50,
    },
    # TinyZero's GRPO run on Countdown (BUILD.md lists each value with the file it comes from): 128 prompts x
    # 5 completions, lr 1e-6, k3 KL at 0.001, verl's entropy bonus 0.001, PPO clip 0.2 both sides, 1,024 new
    # tokens, temperature 1, its reward and puzzles only, sampling on to EOS.
    "tinyzero": {
        "curriculum": "off", "stop_at_answer": False, "skip_zero_std_groups": False, "prompts_per_step": 128,
        "num_generations": 5, "learning_rate": 1e-6, "beta": 0.001, "entropy_coef": 0.001, "epsilon_low": 0.2,
        "epsilon_high": 0.2,
        "max_new_tokens": 1024, "temperature": 1.0, "loss_type": "token_mean", "scale_rewards": "group",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
    },
}


def apply(flag_values: flags.FlagValues, name: str | None) -> None:
    """Set the recipe's values on every flag not given on the command line. Unknown name: exit-2 FlagError."""
    if not name:
        return
    if name not in RECIPES:
        raise FlagError(f"--recipe: unknown recipe {name!r}; choose from {', '.join(sorted(RECIPES))}")
    for flag, value in RECIPES[name].items():
        if not flag_values[flag].present:
            flag_values[flag].value = value
