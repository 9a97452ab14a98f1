"""GRPO on Countdown, end to end: the main job.

    bin/train --output_dir runs/quickstart                 # or: python -m bin.train --output_dir ...
    bin/train --recipe laptop --output_dir runs/laptop    # the recorded 2-core runs (BUILD.md), < 1 hour
    bin/train --recipe tinyzero --machine kaggle-tpu-v5e-8 --model_dir ~/gemma-2-2b --output_dir runs/2b

Every flag is turned into a config at this edge; every bad input (paths, tokenizer/model mismatch, mesh that
does not divide the batch, malformed data file) is reported as one line naming the flag, before anything
compiles. Re-running the same command resumes from the latest checkpoint in --output_dir (--resume).
"""

from __future__ import annotations

import dataclasses
import re
import sys

from absl import flags

from bin import cli
from bin.cli import FlagError
from data.curriculum import SHAPINGS
from grpo.config import LORA_LR_SCALE, GRPOConfig
from grpo.entropy_control import EntropyControl
from grpo.guard import GuardConfig
from grpo.multihost import agreed, check_coordinator, check_same_flags
from grpo.rollout import RolloutConfig
from grpo.trainer import TrainConfig
from model.sampling import SamplingConfig

F = flags.FLAGS
# README's first command is bin/train with its defaults: the shortest version of the laptop recipe that shows
# puzzles solved on a laptop in minutes (BUILD.md, "The main job"). Every default is its config dataclass's
# (one default per setting); LoRA rank 16 is this tool's (full fine-tuning's gradients and Adam state dominate a
# laptop's memory: BUILD.md). Recipes and machines (grpo/presets.py) override defaults, explicit flags win.


def _default(config, name: str):
    """A config dataclass field's default: the flags read their defaults from the configs."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


G, R, T, GC = GRPOConfig, RolloutConfig, TrainConfig, GuardConfig
# Model and data
cli.define_model_dir_flag()
cli.define_tokenizer_flag()
cli.define_dtype_flag("auto")
flags.DEFINE_string("data_file", None, "TinyZero Countdown-Tasks-3to4 file (JSONL or Parquet), or bin/make_dataset's "
                    "--out directory (its train.jsonl / test.jsonl). The top level's puzzles; default: generate.")
flags.DEFINE_integer("num_train_puzzles", 20_000, "Generated puzzles for training (without --data_file).")
flags.DEFINE_enum("template", "base", ["base", "chat"], "Prompt template: TinyZero's base, or Gemma chat turns.")
flags.DEFINE_string("recipe", None, "A named set of algorithm flag defaults (grpo/presets.py): laptop, ladder, "
                    "tinyzero. Explicit flags win.")
flags.DEFINE_string("machine", None, "A named set of hardware flag defaults (grpo/presets.py): kaggle-tpu-v5e-8, "
                    "kaggle-tpu-v3-8, colab-tpu-v5e-1, colab-tpu-v2-8, kaggle-gpu-t4x2, gpu-80g, cpu; or auto (read "
                    "from JAX). Micro-batches and rollout rows are then planned for the model from XLA's memory "
                    "analysis (grpo/planner.py). Explicit flags win.")
flags.DEFINE_string("curriculum", "countdown", "Difficulty ladder (data/curriculum.py): off (TinyZero's puzzles only), "
                    "countdown (two small numbers up to TinyZero's puzzles; worked examples below 4x1-30, shaped "
                    "rewards as --shaping says) or balanced (its 2-number levels drawn so each of + - * / solves 1/4).")
flags.DEFINE_float("promote_at", _default(T, "promote_at"), "Move the frontier up a level once its sampled solved "
                   "rate over the last 4 steps reaches this, in (0, 1].")
flags.DEFINE_enum("shaping", "first_rung", list(SHAPINGS), "Reward shaping on the ladder "
                  "(data/curriculum.py): first_rung pays the middle rungs (some / exactly the given numbers) on the "
                  "first level only and TinyZero's reward above it, so no fixed answer template pays there; legacy "
                  "pays them on every easy level; off is TinyZero's reward everywhere.")
flags.DEFINE_string("start_level", None, "Begin with this level as the frontier (a level name of --curriculum, e.g. "
                    "3x1-30), as if promoted there: with --level_mix the levels below it are mixed in as usual, "
                    "--nolevel_mix trains it alone. Default: the ladder's first.")
flags.DEFINE_bool("level_mix", _default(T, "level_mix"),
                  "Draw each prompt's level from the levels up to the frontier, weighted toward "
                  "those solved about half the time (grpo/level_mix.py); --nolevel_mix: the frontier only.")
flags.DEFINE_float("level_floor", _default(T, "level_floor"),
                   "With --level_mix: the share of prompts the levels below the frontier get "
                   "together at least, in [0, 1), so they are not forgotten.")
flags.DEFINE_string("output_dir", "runs/countdown", "Metrics, samples, checkpoints, the final HF export.")
# Loop
flags.DEFINE_integer("steps", _default(T, "steps"), "GRPO steps (rollout batches).")
flags.DEFINE_integer("prompts_per_step", _default(T, "prompts_per_step"),
                     "Prompts per step; each gets --num_generations completions.")
flags.DEFINE_integer("eval_every", _default(T, "eval_every"),
                     "Greedy eval on the held-out set every N steps (0: only at start and end).")
flags.DEFINE_integer("eval_size", _default(T, "eval_size"), "Held-out puzzles per level for eval (0: no eval).")
cli.define_think_flags()  # the evals' thinking budget (rollouts are never forced)
flags.DEFINE_integer("checkpoint_every", _default(T, "checkpoint_every"), "Checkpoint every N steps (and at the end).")
flags.DEFINE_integer("keep_checkpoints", _default(T, "keep_checkpoints"), "Checkpoints kept.")
flags.DEFINE_integer("seed", _default(T, "seed"), "Seeds data order, sampling and puzzle generation.")
flags.DEFINE_bool("resume", _default(T, "resume"), "Continue from the latest checkpoint in --output_dir.")
flags.DEFINE_list("profile_steps", [], "A,B: wrap loop steps A..B, counted from 0 (metrics.jsonl's A+1..B+1), in "
                  "jax.profiler.trace into <output_dir>/profile.")
flags.DEFINE_string("time_limit", None, "Pause before a step would end past this much wall time (e.g. 8h30m, 45m, "
                    "600s): checkpoint and exit cleanly; re-run to continue. SIGTERM pauses the same way.")
flags.DEFINE_integer("max_bad_steps", _default(GC, "max_bad_steps"), "Stop after this many non-finite steps in a "
                     "row (one of the guard's conditions; --noguard keeps it).")
flags.DEFINE_bool("guard", _default(GC, "enabled"),
                  "Stop a run that degrades (grpo/guard.py): held-out format or solved rate well below "
                  "its best, or entropy above its band, for --guard_patience evals / steps in a row, once armed. "
                  "--noguard: only non-finite steps stop a run.")
flags.DEFINE_integer("guard_warmup_steps", _default(GC, "warmup_steps"),
                     "The guard's conditions arm only from this step on, >= 0.")
flags.DEFINE_integer("guard_patience", _default(GC, "patience"), "Consecutive evals (or steps, for entropy) "
                     "outside the limits that fire the guard, >= 1.")
flags.DEFINE_enum("guard_action", _default(GC, "action"), ["stop", "rollback"], "When the guard fires: stop "
                  "(checkpoint, export final_hf/ and best_hf/, exit 0), or rollback: restore best/, halve the lr.")
flags.DEFINE_integer("max_rollbacks", _default(GC, "max_rollbacks"), "With --guard_action rollback: rollbacks "
                     "before the guard stops, >= 0.")
flags.DEFINE_list("log_to", [], "Also send the numbers to: tensorboard (<output_dir>/tensorboard), wandb "
                  "(offline run in <output_dir>/wandb). metrics.jsonl is always written.")
flags.DEFINE_bool("export_hf", _default(T, "export_hf"),
                  "Write the final params as an HF checkpoint in <output_dir>/final_hf.")
# GRPO knobs (names as in TRL / Tunix)
flags.DEFINE_integer("num_generations", _default(G, "num_generations"), "G: completions per prompt.")
flags.DEFINE_float("learning_rate", _default(G, "learning_rate"),
                   "Peak learning rate (AdamW) for full fine-tuning. With LoRA, when this flag "
                   f"is not given on the command line, {LORA_LR_SCALE:g}x the value (a recipe's or this default).")
flags.DEFINE_float("beta", _default(G, "beta"), "KL coefficient (TinyZero 0.001; 0 skips the reference pass).")
flags.DEFINE_float("entropy_coef", _default(G, "entropy_coef"),
                   "A FIXED entropy bonus: loss -= coef x the --loss_type mean of the "
                   "completion tokens' entropy (verl's entropy_coeff, 0.001 there). 0: off. Without reward signal a "
                   "fixed bonus drives entropy up without bound: prefer --adaptive_entropy.")
flags.DEFINE_bool("adaptive_entropy", _default(G, "entropy_control") is not None,
                  "An entropy bonus that acts only below --target_entropy, its coefficient "
                  "raised while entropy is below it and lowered above (Skywork-OR1; grpo/entropy_control.py). Adds "
                  "to --entropy_coef. --noadaptive_entropy: off.")
flags.DEFINE_float("target_entropy", _default(EntropyControl, "target"),
                   "Nats per completion token that --adaptive_entropy defends, > 0.")
flags.DEFINE_bool("shared_prompt", _default(G, "shared_prompt"),
                  "Run each group's prompt once in the training step and the log-prob passes "
                  "(same numbers, fewer FLOPs: BUILD.md 'Training-step speed'); --noshared_prompt: every row whole.")
flags.DEFINE_float("epsilon_low", _default(G, "epsilon_low"), "PPO clip, lower.")
flags.DEFINE_float("epsilon_high", _default(G, "epsilon_high"), "PPO clip, upper (DAPO clip-higher).")
flags.DEFINE_enum("loss_type", _default(G, "loss_type"), ["token_mean", "sequence_mean", "dr_grpo"], "Loss averaging.")
flags.DEFINE_enum("scale_rewards", _default(G, "scale_rewards"), ["group", "batch", "none"], "Advantage std scaling.")
flags.DEFINE_bool("mask_truncated_completions", _default(G, "mask_truncated_completions"), "Drop completions that "
                  "hit the token budget from the loss.")
flags.DEFINE_integer("num_iterations", _default(G, "num_iterations"), "mu: updates per rollout batch.")
flags.DEFINE_integer("num_micro_batches", _default(G, "num_micro_batches"), "Gradient accumulation micro-batches.")
flags.DEFINE_integer("warmup_steps", _default(G, "warmup_steps"), "Linear warmup updates (steps that update).")
flags.DEFINE_enum("lr_schedule", _default(G, "lr_schedule"), ["constant", "cosine"], "Schedule after warmup.")
flags.DEFINE_float("weight_decay", _default(G, "weight_decay"), "AdamW weight decay.")
flags.DEFINE_float("max_grad_norm", _default(G, "max_grad_norm"), "Global gradient-norm clip.")
cli.define_lora_flags(default_rank=16)
flags.DEFINE_bool("remat", _default(G, "remat"),
                  "Rematerialise each layer in the backward pass (less memory, ~1/3 more FLOPs; "
                  "off, a 64 x 256-token LoRA step of the 270M peaks at ~24 GiB: BUILD.md).")
# Sampling
flags.DEFINE_integer("max_new_tokens", _default(R, "max_new_tokens"), "Completion budget.")
flags.DEFINE_bool("stop_at_answer", _default(R, "stop_at_answer"),
                  "End a rollout (and an eval) once its text has produced </answer>, inside "
                  "the decode loop. TinyZero samples on to EOS or the budget.")
flags.DEFINE_bool("skip_zero_std_groups", _default(R, "skip_zero_std_groups"),
                  "Groups whose rewards are all equal neither enter the loss nor "
                  "dilute its token count (DAPO's dynamic sampling, as a filter). Composes with --dynamic_sampling: "
                  "the groups without signal that still fill its batch at the cap follow this flag.")
flags.DEFINE_bool("dynamic_sampling", _default(R, "dynamic_sampling"),
                  "DAPO's dynamic sampling, as a refill: sample further rounds of "
                  "--prompts_per_step prompts until the step holds --prompts_per_step groups whose rewards differ, "
                  "at most --max_oversample x --prompts_per_step prompts (grpo/dynamic_sampling.py).")
flags.DEFINE_float("max_oversample", _default(R, "max_oversample"),
                   "With --dynamic_sampling: the cap on prompts sampled per step, as a factor "
                   "of --prompts_per_step, >= 1 (rounds of --prompts_per_step: floor of this many).")
flags.DEFINE_integer("rollout_batch_size", _default(R, "batch_rows"),
                     "Rows per sampler call (0: the whole batch at once); a --machine "
                     "caps it so one call's KV cache fits a device.")
flags.DEFINE_float("temperature", SamplingConfig().temperature, "Sampling temperature for rollouts (eval is greedy).")
flags.DEFINE_integer("top_k", SamplingConfig().top_k, "Top-k for rollouts (the loss uses the full softmax).")
flags.DEFINE_float("top_p", SamplingConfig().top_p, "Top-p for rollouts (the loss uses the full softmax).")
# Devices
cli.define_mesh_flag(None)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")


def _load_task(tok):
    from data.task_data import level_puzzles
    from grpo.tasks import CountdownTask

    levels, train, test = _named(level_puzzles, F.curriculum, F.shaping, F.data_file, F.num_train_puzzles,
                                 F.eval_size, F.seed)
    return CountdownTask(train=train, test=test, tokenizer=tok, template=F.template, seed=F.seed, levels=levels)


# Lower bounds of the integer flags: one message per flag (exit 2 before anything is loaded).
MIN_VALUES = {"steps": 0, "prompts_per_step": 1, "num_generations": 2, "max_new_tokens": 1, "eval_every": 0,
              "eval_size": 0, "checkpoint_every": 1, "keep_checkpoints": 1, "seed": 0, "max_bad_steps": 1,
              "guard_warmup_steps": 0, "guard_patience": 1, "max_rollbacks": 0,
              "num_micro_batches": 1, "num_train_puzzles": 1, "rollout_batch_size": 0}
WHY_MIN = {"num_generations": "GRPO compares at least 2 completions per prompt"}


def _check_flags() -> None:
    for name, low in MIN_VALUES.items():
        if F[name].value < low:
            why = f" ({WHY_MIN[name]})" if name in WHY_MIN else ""
            raise FlagError(f"--{name} must be >= {low}, got {F[name].value}{why}")
    if F.profile_steps and (len(F.profile_steps) != 2 or not all(s.isdigit() for s in F.profile_steps)
                            or not int(F.profile_steps[0]) <= int(F.profile_steps[1]) < F.steps):
        raise FlagError(f"--profile_steps: expected A,B with A <= B < --steps ({F.steps}), got "
                        f"{','.join(F.profile_steps)}")
    if not 0 < F.promote_at <= 1:
        raise FlagError(f"--promote_at must be in (0, 1], got {F.promote_at}")
    if not 0 < F.target_entropy < float("inf"):
        raise FlagError(f"--target_entropy must be a finite number > 0, got {F.target_entropy}")
    _check_start_level()
    _named(check_coordinator, F.coordinator_address, F.num_processes, F.process_id)


def _check_start_level() -> None:
    from data import curriculum

    if F.start_level is None:
        return
    try:
        names = [level.name for level in curriculum.ladder(F.curriculum)]
    except ValueError as e:
        raise FlagError(f"--curriculum: {e}") from None
    if F.start_level not in names:
        raise FlagError(f"--start_level: unknown level {F.start_level!r} for --curriculum {F.curriculum}; choose from "
                        f"{', '.join(names)}")


def _our_flags() -> list[str]:
    """The flags bin/train and bin/cli define (not absl's own), sorted."""
    ours = ("bin/train", "bin.train", "bin/cli", "bin.cli", "__main__")
    by_module = F.flags_by_module_dict()
    return sorted({flag.name for module, defined in by_module.items() if any(o in module for o in ours)
                   for flag in defined})


def _check_budget(task) -> int:
    """The longest prompt's bucket plus --max_new_tokens must fit the sampler's cache. Returns the longest
    prompt's length in tokens."""
    from model.sampler import check_fits

    items = [it for level in range(len(task.levels)) for it in task.eval_items(level)]
    items += task.train_items(0, min(len(task.train[-1]), 256), level=len(task.levels) - 1)
    longest = max(len(task.encode_prompt(it)) for it in items)
    _named(check_fits, longest, F.max_new_tokens)
    return longest


def _check_batch_layout(axes: dict[str, int]) -> None:
    batch = F.prompts_per_step * F.num_generations
    shards = axes["data"] * axes["fsdp"] * F.num_micro_batches
    if batch % shards:
        raise FlagError(f"--mesh/--num_micro_batches: the batch of {batch} rows (--prompts_per_step x "
                        f"--num_generations) does not divide into {axes['data']}x{axes['fsdp']} devices x "
                        f"{F.num_micro_batches} micro-batches")


def _configs(compute_dtype: str | None):
    """GRPOConfig, RolloutConfig and TrainConfig from the flags; a rejected value names its flag."""
    from grpo.loggers import check_names  # an unknown logger or a missing package: one line naming --log_to

    eval_think, time_limit_s, log_to = cli.think_budget(F.max_new_tokens), _time_limit_s(), tuple(
        _named(check_names, F.log_to))
    try:  # the configs name the field, which is the flag's name
        grpo_cfg = GRPOConfig(
            num_generations=F.num_generations, beta=F.beta, entropy_coef=F.entropy_coef,
            epsilon_low=F.epsilon_low, epsilon_high=F.epsilon_high, max_completion_length=F.max_new_tokens,
            loss_type=F.loss_type, scale_rewards=F.scale_rewards, num_micro_batches=F.num_micro_batches,
            mask_truncated_completions=F.mask_truncated_completions, learning_rate=_learning_rate(),
            warmup_steps=F.warmup_steps, lr_schedule=F.lr_schedule, total_steps=max(F.steps * F.num_iterations, 1),
            weight_decay=F.weight_decay, max_grad_norm=F.max_grad_norm, remat=F.remat,
            num_iterations=F.num_iterations, compute_dtype=compute_dtype, shared_prompt=F.shared_prompt,
            entropy_control=EntropyControl(target=F.target_entropy) if F.adaptive_entropy else None)
        sampling = SamplingConfig(temperature=F.temperature, top_k=F.top_k, top_p=F.top_p)
        rollout_cfg = RolloutConfig(max_new_tokens=F.max_new_tokens, sampling=sampling,
                                    stop_at_answer=F.stop_at_answer, skip_zero_std_groups=F.skip_zero_std_groups,
                                    batch_rows=F.rollout_batch_size, dynamic_sampling=F.dynamic_sampling,
                                    max_oversample=F.max_oversample)
        train_cfg = TrainConfig(
            output_dir=F.output_dir, steps=F.steps, prompts_per_step=F.prompts_per_step, eval_every=F.eval_every,
            eval_size=F.eval_size, checkpoint_every=F.checkpoint_every, keep_checkpoints=F.keep_checkpoints,
            seed=F.seed, resume=F.resume, export_hf=F.export_hf,
            profile_steps=tuple(int(s) for s in F.profile_steps) if F.profile_steps else None,
            log_to=log_to, promote_at=F.promote_at, time_limit_s=time_limit_s, task_flags=_task_flags(),
            level_mix=F.level_mix, level_floor=F.level_floor, start_level=F.start_level, eval_think=eval_think,
            guard=GuardConfig(enabled=F.guard, warmup_steps=F.guard_warmup_steps, patience=F.guard_patience,
                              max_bad_steps=F.max_bad_steps, action=F.guard_action, max_rollbacks=F.max_rollbacks))
    except ValueError as e:
        raise FlagError(f"--{e}") from None
    return grpo_cfg, rollout_cfg, train_cfg


def _task_flags() -> dict:
    """The flags that define the puzzles, prompts and held-out sets (a resume must keep them: TrainConfig)."""
    names = ("curriculum", "shaping", "template", "data_file", "num_train_puzzles", "seed", "eval_size", "start_level")
    return {name: F[name].value for name in names}


def _learning_rate() -> float:
    """--learning_rate as given; else the recipe's / default full-fine-tuning rate, x LORA_LR_SCALE with LoRA
    (grpo/config.py)."""
    if F["learning_rate"].present or not F.lora_rank:
        return F.learning_rate
    return F.learning_rate * LORA_LR_SCALE


def _time_limit_s() -> float | None:
    """--time_limit as seconds: h/m/s parts (8h30m, 45m, 90s) or plain seconds."""
    if F.time_limit is None:
        return None
    text = F.time_limit.strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or not parts or not any(parts.groups()):
        raise FlagError(f"--time_limit: expected a duration like 8h30m, 45m or 600s, got {F.time_limit!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise FlagError(f"--time_limit must be positive, got {F.time_limit!r}")
    return total


def _setup():
    """Everything that can fail on user input, before any weights load. Returns what train() needs."""
    from grpo import presets

    if F.recipe:
        presets.apply(F, _named(presets.recipe, F.recipe))
    given = {name: F[name].value for name in ("num_micro_batches", "rollout_batch_size") if F[name].present}
    if F.machine and F.machine != presets.AUTO:
        presets.apply(F, _named(presets.get_machine, F.machine).train_flags())
    if F.machine:  # a planned run takes GPU_MEM_FRACTION of a GPU (JAX's default: 75%), before JAX starts
        presets.claim_gpu_memory()
    _check_flags()
    import jax

    if not F.coordinator_address:
        return _host_setup(presets, given)
    jax.distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
    _named(check_same_flags, {n: F[n].value for n in _our_flags() if n != "process_id"}, F.process_id)
    return _named(agreed, lambda: _host_setup(presets, given))  # one process's bad file stops them all at once


def _host_setup(presets, given):
    """_setup's checks of this host's files and of the devices (a multi-host run: after the processes agree)."""
    import jax

    import grpo
    from grpo import planner
    from grpo.run_files import check_resume_layout, claim_run_dir

    cli.expand_user("output_dir", "data_file")
    machine = _machine(presets, planner, jax.devices())
    axes = cli.parse_mesh(F.mesh, len(jax.devices()))
    dtype, compute_dtype = cli.resolve_dtypes(F.dtype, jax.default_backend())
    _configs(compute_dtype)  # bad GRPO / rollout values fail before the model is read
    model_dir = cli.resolve_model_dir(F.model_dir)
    model_cfg = cli.load_model_config(model_dir)
    if machine:
        _named(planner.check_full_fine_tuning, machine, model_cfg, axes["fsdp"], F.lora_rank)
    lora_cfg = cli.lora_config(model_cfg)
    _named(check_resume_layout, F.output_dir, F.resume, lora_cfg, _task_flags(), model_dir)
    tok = cli.load_tokenizer(F.tokenizer, model_dir, model_cfg)
    task = _load_task(tok)
    longest = _check_budget(task)
    mesh = grpo.make_mesh(data=axes["data"], fsdp=axes["fsdp"])
    if machine:
        _plan(machine, planner, given, model_cfg, lora_cfg, dtype, compute_dtype, mesh, longest)
    grpo_cfg, rollout_cfg, train_cfg = _configs(compute_dtype)
    _check_batch_layout(axes)
    _named(claim_run_dir, cli.check_writable_dir("output_dir", F.output_dir))  # last: a bad flag leaves nothing
    return model_dir, dtype, task, grpo_cfg, rollout_cfg, train_cfg, mesh, lora_cfg


def _named(fn, *args):
    """fn(*args), its ValueError (whose message names the flag) as a FlagError."""
    with cli.flag_errors():
        return fn(*args)


def _machine(presets, planner, devices):
    """--machine as a Machine (auto: read from JAX, its hardware defaults applied now), checked against the
    devices present; None without --machine."""
    if not F.machine:
        return None
    machine = _named(planner.resolve_machine, F.machine, devices)
    if F.machine == presets.AUTO:
        presets.apply(F, machine.train_flags())
    return machine


def _plan(machine, planner, given, model_cfg, lora_cfg, dtype, compute_dtype, mesh, longest_prompt: int) -> None:
    """Micro-batches and rollout rows for this model on this machine (grpo/planner.py), set on the flags."""
    import jax

    from grpo.rollout import align_grpo_config

    _named(planner.check_platform, machine, jax.default_backend())
    grpo_cfg, rollout_cfg, _ = _configs(compute_dtype)
    plan = _named(lambda: planner.plan_run(
        machine, model_cfg, align_grpo_config(grpo_cfg, rollout_cfg), mesh, lora_cfg=lora_cfg, param_dtype=dtype,
        rows=F.prompts_per_step * F.num_generations, prompt_len=longest_prompt, new_tokens=F.max_new_tokens,
        stop_states=len("</answer>") if F.stop_at_answer else 1, backend=jax.default_backend(), given=given))
    F.num_micro_batches, F.rollout_batch_size = plan.num_micro_batches, plan.rollout_rows
    print(f"machine {machine.name} ({machine.about}): mesh {F.mesh or 'fsdp over all devices'}, dtype {F.dtype}, "
          f"remat={F.remat}, lora_rank {F.lora_rank}; plan: {plan.describe()}", flush=True)


def main(argv):
    cli.no_extra_args(argv)
    model_dir, dtype, task, grpo_cfg, rollout_cfg, train_cfg, mesh, lora_cfg = _setup()
    from grpo import planner
    from grpo.checkpoints import CheckpointMismatch
    from grpo.run_files import RunWriteError, quiet_failed_writes
    from grpo.trainer import train

    model_cfg, params = _named(agreed, lambda: cli.load_model(model_dir, dtype, mesh))  # one bad host stops all
    print(f"model {model_dir}: {model_cfg.arch}, {model_cfg.num_params() / 1e6:.0f}M params, {dtype.__name__}; "
          f"levels {', '.join(task.level_names)}; {len(task.train[-1])} train / {len(task.test[-1])} eval puzzles "
          f"per level; mesh {dict(mesh.shape)}; "
          + (f"LoRA rank {lora_cfg.rank}" if lora_cfg else "full fine-tuning") + f", lr {grpo_cfg.learning_rate:g}")
    try:
        result = train(model_cfg, params, task, grpo_cfg, rollout_cfg, train_cfg, mesh, lora_cfg=lora_cfg)
    except CheckpointMismatch as e:
        raise FlagError(f"--output_dir: {e} (use another --output_dir, or --noresume to start over there)") from None
    except RunWriteError as e:  # disk full, quota: what was written before stays valid; re-run to continue
        quiet_failed_writes()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # XLA out of memory: one line that says what lowers memory (checkpoints are kept)
        advice = planner.out_of_memory_advice(e, planned=bool(F.machine))
        if advice is None:
            raise
        print(f"error: {advice}", file=sys.stderr)
        sys.exit(1)
    if result["final_state"] == "finished" and result.get("reward_mean") is not None:  # else its line said why
        solved = f", eval solved {result['eval_solved_frac']:.3f}" if "eval_solved_frac" in result else ""
        print(f"done: last step reward {result['reward_mean']:.3f}{solved}; metrics in {F.output_dir}/metrics.jsonl")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, argv)


if __name__ == "__main__":
    run()
