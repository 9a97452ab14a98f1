"""The GRPO training loop: sample -> score -> advantages -> (ref log-probs) -> step -> metrics -> eval -> checkpoint.

Resumability: everything random is derived from (seed, step) with `fold_in`, and the data stream is a pure
function of (seed, position), so restoring params, optimizer state, step and data position from the last
checkpoint continues the exact trajectory of a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import model
from grpo.checkpoints import TrainCheckpointer
from grpo.rollout import aha_counts, build_batch
from grpo.tasks import Task


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    steps: int = 10
    prompts_per_step: int = 4
    eval_every: int = 0  # 0: no periodic eval (step 0 and the final step still run when eval_size > 0)
    eval_size: int = 32
    checkpoint_every: int = 5
    keep_checkpoints: int = 3
    seed: int = 0
    resume: bool = True
    profile_steps: tuple[int, int] | None = None  # [A, B] inclusive, wrapped in jax.profiler.trace
    max_bad_steps: int = 3  # this many non-finite steps in a row stop the run
    samples_per_step: int = 2  # completions written to train_samples.jsonl each step
    export_hf: bool = True  # write the final params as an HF checkpoint dir (final_hf/)


class RunLog:
    """Console line + JSON lines per step; only process 0 writes."""

    def __init__(self, out: Path, echo: Callable[[str], None] = print):
        self.out, self.echo = out, echo
        self.main = jax.process_index() == 0

    def write(self, file: str, record: dict) -> None:
        if self.main:
            with open(self.out / file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, line: str) -> None:
        if self.main:
            self.echo(line)


def _score_all(task: Task, items: list, tokens: np.ndarray, lengths: np.ndarray):
    scored = [task.score(it, tokens[i, : int(lengths[i])]) for i, it in enumerate(items)]
    rewards = np.array([s.reward for s in scored], np.float32)
    return scored, rewards


def evaluate(params, cfg, task: Task, sampling: SamplingConfig, batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Greedy accuracy (solved fraction) and format rate on the task's fixed held-out set."""
    items = task.eval_items()
    scored = []
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        res = model.generate(params, cfg, [task.encode_prompt(it) for it in chunk], jax.random.key(0),
                             max_new_tokens=sampling.max_new_tokens, temperature=0.0, eos_ids=task.eos_ids)
        scored += _score_all(task, chunk, np.asarray(res.tokens), np.asarray(res.lengths))[0]
    metrics = {
        "eval_solved_frac": float(np.mean([s.solved for s in scored])),
        "eval_format_frac": float(np.mean([s.format for s in scored])),
        "eval_reward_mean": float(np.mean([s.reward for s in scored])),
    }
    samples = [{"item": repr(it), "completion": s.text, "reward": s.reward}
               for it, s in zip(items, scored, strict=True)]
    return metrics, samples


def _rollout(params, cfg, task: Task, items: list, g: int, sampling: SamplingConfig, key, grpo_cfg):
    """Sample G completions per prompt and turn them into a training batch (numpy) plus per-step metrics."""
    from grpo import compute_advantages

    expanded = [it for it in items for _ in range(g)]
    prompts = [task.encode_prompt(it) for it in expanded]
    t0 = time.perf_counter()
    res = model.generate(params, cfg, prompts, key, max_new_tokens=sampling.max_new_tokens,
                         temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                         eos_ids=task.eos_ids)
    tokens, lengths, truncated = (np.asarray(x) for x in (res.tokens, res.lengths, res.truncated))
    sample_s = time.perf_counter() - t0
    scored, rewards = _score_all(task, expanded, tokens, lengths)
    advantages = np.asarray(compute_advantages(rewards, g, grpo_cfg.scale_rewards), np.float32)
    batch = build_batch(prompts, tokens, lengths, truncated, advantages, pad_id=cfg.pad_id)
    texts = [s.text for s in scored]
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "solved_frac": float(np.mean([s.solved for s in scored])),
        "format_frac": float(np.mean([s.format for s in scored])),
        "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
        "truncated_frac": float(truncated.mean()), "sample_s": sample_s,
        "sample_tokens_per_s": float(lengths.sum() / max(sample_s, 1e-9)),
        **aha_counts(texts),
    }
    return batch, metrics, scored, expanded


@functools.lru_cache(maxsize=8)
def _compiled_fns(cfg, grpo_cfg, mesh):
    """The jitted step and log-prob functions, made once per (model, GRPO config, mesh): a resumed run in the
    same process (tests, notebooks) reuses the compiled code instead of tracing again."""
    import grpo

    return (grpo.make_step(cfg, grpo_cfg, mesh),
            grpo.make_sharded_logprobs(cfg, mesh, temperature=grpo_cfg.temperature, tail=grpo_cfg.logprob_tail))


def train(cfg, params, task: Task, grpo_cfg, sampling: SamplingConfig, tcfg: TrainConfig, mesh,
          echo: Callable[[str], None] = print) -> dict:
    """Run GRPO; returns the last step's metrics (and the latest eval metrics)."""
    import grpo

    out = Path(tcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, echo)
    params, opt_state = grpo.init_train_state(params, cfg, grpo_cfg, mesh)
    # The reference policy is the starting point; only kept (and only run) when the KL term is on.
    ref_params = jax.tree.map(jnp.copy, params) if grpo_cfg.beta > 0 else None
    step_fn, logprobs_fn = _compiled_fns(cfg, grpo_cfg, mesh)
    ckpt = TrainCheckpointer(out / "checkpoints", keep=tcfg.keep_checkpoints)
    start, position = 0, 0
    if tcfg.resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        params, opt_state, record = ckpt.restore(start, params, opt_state)
        position = int(record["data_position"])
        log.say(f"resumed from {ckpt.directory}/{start} (data position {position})")
    base_key = jax.random.key(tcfg.seed)
    g, last, bad_in_a_row, last_eval = grpo_cfg.num_generations, {}, 0, {}

    def run_eval(step: int) -> None:
        nonlocal last_eval
        if tcfg.eval_size <= 0:
            return
        t0 = time.perf_counter()
        last_eval, samples = evaluate(params, cfg, task, sampling)
        last_eval["eval_s"] = time.perf_counter() - t0
        log.write("eval.jsonl", {"step": step, **last_eval})
        for s in samples[:8]:
            log.write("eval_samples.jsonl", {"step": step, **s})
        log.say(f"eval step {step}: solved {last_eval['eval_solved_frac']:.3f} "
                f"format {last_eval['eval_format_frac']:.3f} reward {last_eval['eval_reward_mean']:.3f} "
                f"({last_eval['eval_s']:.1f}s)")

    if start == 0:
        run_eval(0)
    profiling = False
    for step in range(start, tcfg.steps):
        if tcfg.profile_steps and step == tcfg.profile_steps[0]:
            jax.profiler.start_trace(str(out / "profile"))
            profiling = True
        key = jax.random.fold_in(base_key, step)
        items = task.train_items(position, tcfg.prompts_per_step)
        batch, metrics, scored, expanded = _rollout(params, cfg, task, items, g, sampling, key, grpo_cfg)
        position += tcfg.prompts_per_step
        t0 = time.perf_counter()
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        if ref_params is not None:
            batch["ref_logprobs"] = logprobs_fn(ref_params, batch["tokens"], batch["attention_mask"])
        if grpo_cfg.num_iterations > 1:  # with mu == 1 the step uses stop_gradient(logp): ratio == 1, no extra pass
            batch["old_logprobs"] = logprobs_fn(params, batch["tokens"], batch["attention_mask"])
        for _ in range(grpo_cfg.num_iterations):
            params, opt_state, step_metrics = step_fn(params, opt_state, batch)
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        train_s = time.perf_counter() - t0
        n_tokens = float(np.asarray(batch["attention_mask"]).sum())
        metrics.update(step_metrics, step=step + 1, train_s=train_s, train_tokens_per_s=n_tokens / train_s)
        metrics.setdefault("kl", None)  # JSON null when beta == 0: no reference pass ran, never a silent nan
        log.write("metrics.jsonl", metrics)
        for it, s in list(zip(expanded, scored, strict=True))[: tcfg.samples_per_step]:
            log.write("train_samples.jsonl", {"step": step + 1, "item": repr(it), "completion": s.text,
                                              "reward": s.reward})
        log.say(_console_line(metrics))
        last = metrics
        if profiling and step == tcfg.profile_steps[1]:
            jax.profiler.stop_trace()
            profiling = False
        bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped", 0) else 0
        if bad_in_a_row >= tcfg.max_bad_steps:
            log.say(f"stopping: {bad_in_a_row} non-finite steps in a row; last good state saved at step {step + 1}")
            ckpt.save(step + 1, params, opt_state, {"step": step + 1, "data_position": position,
                                                     "seed": tcfg.seed})
            break
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 or step + 1 == tcfg.steps:
            run_eval(step + 1)
        if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == tcfg.steps:
            ckpt.save(step + 1, params, opt_state, {"step": step + 1, "data_position": position, "seed": tcfg.seed})
    if profiling:
        jax.profiler.stop_trace()
    ckpt.close()
    if tcfg.export_hf and jax.process_index() == 0:
        model.save_hf_checkpoint(out / "final_hf", cfg, params)
    return {**last, **last_eval, "params": params}


def _console_line(m: dict) -> str:
    kl = "   -   " if m.get("kl") is None else f"{m['kl']:.4f}"
    return (f"step {m['step']:4d} | reward {m['reward_mean']:.3f} solved {m['solved_frac']:.2f} "
            f"format {m['format_frac']:.2f} | len {m['completion_len_mean']:5.1f} | kl {kl} "
            f"clip {m.get('clip_frac', 0.0):.3f} | aha {int(m['aha_count'])} | sample {m['sample_s']:.1f}s "
            f"train {m['train_s']:.1f}s | {m['sample_tokens_per_s']:.0f} tok/s"
            + (" | SKIPPED (non-finite)" if m.get("skipped") else ""))
