"""GRPO on Countdown, end to end: the main job.

    bin/train --output_dir runs/quickstart                 # embedded Gemma 3 270M, CPU-sized defaults
    bin/train --model_dir ~/gemma-2-2b --dtype bfloat16 --mesh data=1,fsdp=8 --prompts_per_step 16 \\
        --num_generations 8 --max_new_tokens 512 --steps 500 --learning_rate 1e-6 --output_dir runs/2b

Every flag is turned into a config at this edge; every bad input (paths, tokenizer/model mismatch, mesh that
does not divide the batch, malformed data file) is reported as one line naming the flag, before anything
compiles. Re-running the same command resumes from the latest checkpoint in --output_dir (--resume).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

F = flags.FLAGS
# Model and data
flags.DEFINE_string("model_dir", None, "HF-layout checkpoint dir (config.json + safetensors). Default: the embedded "
                    "Gemma 3 270M, imported once from the GGUF package into ~/.cache.")
flags.DEFINE_string("tokenizer", None, "SentencePiece model file. Default: <model_dir>/tokenizer.model.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "auto: float32 params everywhere, bf16 compute off-CPU (bf16 params lose lr-1e-6 updates).")
flags.DEFINE_string("data_file", None, "TinyZero Countdown-Tasks-3to4 file (JSONL or Parquet). Default: generate.")
flags.DEFINE_integer("num_train_puzzles", 20_000, "Generated puzzles for training (without --data_file).")
flags.DEFINE_enum("template", "base", ["base", "chat"], "Prompt template: TinyZero's base, or Gemma chat turns.")
flags.DEFINE_string("output_dir", "runs/countdown", "Metrics, samples, checkpoints, the final HF export.")
# Loop
flags.DEFINE_integer("steps", 5, "GRPO steps (rollout batches).")
flags.DEFINE_integer("prompts_per_step", 4, "Prompts per step; each gets --num_generations completions.")
flags.DEFINE_integer("eval_every", 0, "Greedy eval on the held-out set every N steps (0: only at start and end).")
flags.DEFINE_integer("eval_size", 32, "Held-out puzzles for eval (0: no eval).")
flags.DEFINE_integer("checkpoint_every", 2, "Checkpoint every N steps (and at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("seed", 0, "Seeds data order, sampling and puzzle generation.")
flags.DEFINE_bool("resume", True, "Continue from the latest checkpoint in --output_dir.")
flags.DEFINE_list("profile_steps", [], "A,B: wrap steps A..B in jax.profiler.trace into <output_dir>/profile.")
flags.DEFINE_integer("max_bad_steps", 3, "Stop after this many non-finite steps in a row.")
flags.DEFINE_bool("export_hf", True, "Write the final params as an HF checkpoint in <output_dir>/final_hf.")
# GRPO knobs (names as in TRL / Tunix)
flags.DEFINE_integer("num_generations", 4, "G: completions per prompt.")
flags.DEFINE_float("learning_rate", 1e-5, "Peak learning rate (AdamW).")
flags.DEFINE_float("beta", 0.0, "KL coefficient (TinyZero 0.001; 0 skips the reference pass).")
flags.DEFINE_float("epsilon_low", 0.2, "PPO clip, lower.")
flags.DEFINE_float("epsilon_high", 0.28, "PPO clip, upper (DAPO clip-higher).")
flags.DEFINE_enum("loss_type", "token_mean", ["token_mean", "sequence_mean", "dr_grpo"], "Loss aggregation.")
flags.DEFINE_enum("scale_rewards", "group", ["group", "batch", "none"], "Advantage std normalisation.")
flags.DEFINE_bool("mask_truncated_completions", False, "Drop completions that hit the token budget from the loss.")
flags.DEFINE_integer("num_iterations", 1, "mu: updates per rollout batch.")
flags.DEFINE_integer("num_micro_batches", 1, "Gradient accumulation micro-batches per step.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps.")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule after warmup.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_float("max_grad_norm", 1.0, "Global gradient-norm clip.")
flags.DEFINE_bool("remat", False, "Rematerialise each layer in the backward pass (less memory, ~1/3 more FLOPs).")
# Sampling
flags.DEFINE_integer("max_new_tokens", 128, "Completion budget.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature for rollouts (eval is greedy).")
flags.DEFINE_integer("top_k", None, "Top-k for rollouts.")
flags.DEFINE_float("top_p", None, "Top-p for rollouts.")
# Devices
flags.DEFINE_string("mesh", None, "Mesh axes, e.g. data=2,fsdp=4. Default: fsdp over all devices.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")


class FlagError(ValueError):
    """A bad flag value: printed as one line naming the flag."""


def _parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    if not text:
        return {"data": 1, "fsdp": n_devices}
    axes = {"data": 1, "fsdp": 1}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in axes or not value.strip().isdigit() or int(value) < 1:
            raise FlagError(f"--mesh: expected data=N,fsdp=M, got {text!r}")
        axes[name.strip()] = int(value)
    if axes["data"] * axes["fsdp"] != n_devices:
        raise FlagError(f"--mesh: {text} uses {axes['data'] * axes['fsdp']} devices but {n_devices} are present")
    return axes


def _load_task(cfg, tok):
    from data import puzzles, tinyzero
    from grpo.tasks import CountdownTask

    if F.data_file:
        try:
            train = tinyzero.load_puzzles(F.data_file, *tinyzero.TINYZERO_TRAIN)
            test = tinyzero.load_puzzles(F.data_file, *tinyzero.TINYZERO_TEST)[: F.eval_size]
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise FlagError(f"--data_file: {e}") from None
        if not train:
            raise FlagError(f"--data_file: no training rows in {F.data_file}")
    else:
        train, test = puzzles.make_splits(F.num_train_puzzles, F.eval_size, F.seed)
    return CountdownTask(train=train, test=test, tokenizer=tok, template=F.template, seed=F.seed)


def _check_flags() -> None:
    if F.steps < 0 or F.prompts_per_step < 1 or F.num_generations < 1 or F.max_new_tokens < 1:
        raise FlagError("--steps >= 0, --prompts_per_step >= 1, --num_generations >= 1, --max_new_tokens >= 1")
    if F.num_generations < 2:
        raise FlagError("--num_generations: GRPO needs at least 2 completions per prompt to compare")
    if F.profile_steps and (len(F.profile_steps) != 2 or not all(s.isdigit() for s in F.profile_steps)):
        raise FlagError(f"--profile_steps: expected A,B, got {','.join(F.profile_steps)}")
    if F.checkpoint_every < 1:
        raise FlagError("--checkpoint_every must be >= 1")


def _setup():
    """Everything that can fail on user input, before any compile. Returns what train() needs."""
    _check_flags()
    import jax
    import jax.numpy as jnp

    import grpo
    import model
    from grpo.trainer import SamplingConfig, TrainConfig
    from model.tokenizer import Tokenizer

    if F.coordinator_address:
        jax.distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
    model_dir = F.model_dir
    if model_dir is None:
        from model.default_model import default_model_dir

        model_dir = str(default_model_dir())
    if not os.path.isdir(model_dir):
        raise FlagError(f"--model_dir: checkpoint directory not found: {model_dir}")
    tok_path = F.tokenizer or os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FlagError(f"--tokenizer: no tokenizer file at {tok_path}")
    try:
        cfg = model.load_config(model_dir)
    except (ValueError, FileNotFoundError) as e:
        raise FlagError(f"--model_dir: {e}") from None
    tok = Tokenizer(tok_path)
    # Multimodal checkpoints carry a few extra rows; a different tokenizer family differs by thousands.
    if not 0 <= cfg.vocab_size - tok.vocab_size <= 1024:
        raise FlagError(f"--tokenizer: {tok_path} has {tok.vocab_size} pieces but the model's vocabulary is "
                        f"{cfg.vocab_size}: tokenizer and model do not match")
    axes = _parse_mesh(F.mesh, len(jax.devices()))
    batch = F.prompts_per_step * F.num_generations
    shards = axes["data"] * axes["fsdp"] * F.num_micro_batches
    if batch % shards:
        raise FlagError(f"--mesh/--num_micro_batches: the batch of {batch} rows (--prompts_per_step x "
                        f"--num_generations) does not divide into {axes['data']}x{axes['fsdp']} devices x "
                        f"{F.num_micro_batches} micro-batches")
    task = _load_task(cfg, tok)
    dtype = jnp.bfloat16 if F.dtype == "bfloat16" else jnp.float32
    # f32 master weights with bf16 matmuls on TPU/GPU; on CPU bf16 is slower than f32, so f32 throughout.
    compute_dtype = "bfloat16" if F.dtype == "auto" and jax.default_backend() != "cpu" else None
    grpo_cfg = grpo.GRPOConfig(
        num_generations=F.num_generations, beta=F.beta, epsilon_low=F.epsilon_low, epsilon_high=F.epsilon_high,
        loss_type=F.loss_type, scale_rewards=F.scale_rewards, mask_truncated_completions=F.mask_truncated_completions,
        num_micro_batches=F.num_micro_batches, learning_rate=F.learning_rate, warmup_steps=F.warmup_steps,
        lr_schedule=F.lr_schedule, total_steps=max(F.steps * F.num_iterations, 1), weight_decay=F.weight_decay,
        max_grad_norm=F.max_grad_norm, remat=F.remat, num_iterations=F.num_iterations,
        max_completion_length=F.max_new_tokens, logprob_tail=F.max_new_tokens, compute_dtype=compute_dtype,
        temperature=F.temperature if F.temperature > 0 else 1.0,
    )
    sampling = SamplingConfig(max_new_tokens=F.max_new_tokens, temperature=F.temperature, top_k=F.top_k,
                              top_p=F.top_p)
    tcfg = TrainConfig(
        output_dir=F.output_dir, steps=F.steps, prompts_per_step=F.prompts_per_step, eval_every=F.eval_every,
        eval_size=F.eval_size, checkpoint_every=F.checkpoint_every, keep_checkpoints=F.keep_checkpoints,
        seed=F.seed, resume=F.resume, max_bad_steps=F.max_bad_steps, export_hf=F.export_hf,
        profile_steps=tuple(int(s) for s in F.profile_steps) if F.profile_steps else None,
    )
    mesh = grpo.make_mesh(data=axes["data"], fsdp=axes["fsdp"])
    return model_dir, dtype, task, grpo_cfg, sampling, tcfg, mesh


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        model_dir, dtype, task, grpo_cfg, sampling, tcfg, mesh = _setup()
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import model
    from grpo.trainer import train

    cfg, params = model.load_hf_checkpoint(model_dir, dtype=dtype)
    print(f"model {model_dir}: {cfg.arch}, {cfg.num_params() / 1e6:.0f}M params, {dtype.__name__}; "
          f"{len(task.train)} train / {len(task.test)} eval puzzles; mesh {dict(mesh.shape)}")
    result = train(cfg, params, task, grpo_cfg, sampling, tcfg, mesh)
    if result.get("reward_mean") is not None:
        print(f"done: last step reward {result['reward_mean']:.3f}, eval solved "
              f"{result.get('eval_solved_frac', float('nan')):.3f}; metrics in {F.output_dir}/metrics.jsonl")


if __name__ == "__main__":
    app.run(main)
