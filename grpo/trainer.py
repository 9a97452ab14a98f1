"""The GRPO training loop, as phases a test can call one at a time.

One step (`train_step`) runs, in order:
    rollout_phase     sample G completions per prompt, score them, build the batch (grpo.rollout)
    logprob_phase     reference / old-policy log-probs, only when the objective needs them
    update_phase      num_iterations calls of the jitted, sharded step
    record_step       metrics.jsonl, train_samples.jsonl and the console line
and around the steps: `start_run` (init, resume), `eval_phase` (greedy eval on the held-out set),
`checkpoint_phase`, `Profiler` (jax.profiler over --profile_steps) and `finish_run` (close, HF export).

What trains is a policy (grpo/policy.py): a frozen tree (LoRA: the base model; full fine-tuning: nothing) and a
trained tree (the adapters, or the params), built once in `start_run`. Every phase calls the same step and log-prob
functions with (frozen, trained) in that order, so no phase knows or asks which fine-tuning mode runs.

Resumability: everything random is derived from (seed, step) with `fold_in`, and the data stream is a pure
function of (seed, position), so restoring params, optimizer state, step and data position from the last
checkpoint continues the exact trajectory of a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo import level_mix, run_files
from grpo.best_model import BestCheckpointer, better, eval_score
from grpo.checkpoints import TrainCheckpointer
from grpo.config import GRPOConfig
from grpo.dynamic_sampling import max_rounds, sample_with_signal
from grpo.entropy_control import applied_coef, band_note, next_coef
from grpo.evaluation import EVAL_BATCH, evaluate
from grpo.guard import GuardState, after_rollback, observe
from grpo.ladder_steps import after_levels, draw_items, level_metrics, level_names, step_level_shares
from grpo.level_mix import LevelStats
from grpo.loggers import make_loggers
from grpo.logprobs import cast_params, make_policy_logprobs, step_settings
from grpo.multihost import any_process_stops
from grpo.policy import FullPolicy, Policy, abstract_trained_state, init_trained_state, make_policy
from grpo.rollout import (
    Rollout,
    RolloutConfig,
    SampledRows,
    align_grpo_config,
    check_shared_prompts,
    make_rollout,
    rollout_metrics,
    sample_record,
    sample_rows,
)
from grpo.run_clock import Profiler, StopClock
from grpo.run_files import RunLog, RunWriteError, console_line, describe_write_failure, export_hf, peak_rss_bytes
from grpo.run_state import LoopState, RunContext, TrainConfig
from grpo.step import make_policy_step
from grpo.tasks import Task
from model.config import GemmaConfig
from model.lora import LoraConfig

EVAL_SAMPLES_KEPT = 8  # eval completions per held-out set written to eval_samples.jsonl per eval


@functools.lru_cache(maxsize=8)
def _compiled_step(policy: Policy, grpo_cfg: GRPOConfig, mesh: Mesh) -> Callable:
    """The step, made once per (policy, GRPO config, mesh): a resumed run in the same process (tests, notebooks)
    reuses the compiled code; a rollback's lower learning rate makes another."""
    return make_policy_step(policy, grpo_cfg, mesh)


@functools.lru_cache(maxsize=8)
def _compiled_logprobs(policy: Policy, grpo_cfg: GRPOConfig, mesh: Mesh) -> Callable:
    """The old-policy / reference pass with the step's own settings (same compute dtype, chunks, micro-batches),
    so iteration 1 has ratio exactly 1 and a step at the reference has KL exactly 0."""
    return make_policy_logprobs(policy, mesh, **step_settings(grpo_cfg))


def policy_params(ctx: RunContext, state: LoopState) -> dict:
    """The params the policy samples and evaluates with: the policy's merged weights (LoRA: base + adapters merged
    once), in the step's compute dtype (bf16 compute samples from a bf16 copy: half the weight and KV-cache
    bytes)."""
    return cast_params(ctx.policy.merged(ctx.frozen, state.params), ctx.grpo_cfg.compute_dtype)


def start_run(model_cfg: GemmaConfig, params: dict, task: Task, grpo_cfg: GRPOConfig, rollout_cfg: RolloutConfig,
              train_cfg: TrainConfig, mesh: Mesh, echo: Callable[[str], None] = print,
              policy: Policy | None = None) -> tuple[RunContext, LoopState]:
    """Place the policy on the mesh, build the optimizer state, and restore the latest checkpoint if resuming.

    policy (grpo/policy.py make_policy; None: full fine-tuning) says what the given params become: all of them
    trained, or (LoRA) the frozen base under fresh adapters (b = 0, drawn from the run's seed), the optimizer
    state then holding adapter moments only.
    """
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    aside = run_files.start_over(out, train_cfg.resume)
    grpo_cfg = align_grpo_config(grpo_cfg, rollout_cfg)
    policy = FullPolicy(model_cfg) if policy is None else policy
    if policy.model_cfg != model_cfg:
        raise ValueError(f"the policy is for {policy.model_cfg.name}, the params for {model_cfg.name}")
    frozen, params = policy.start(params, jax.random.key(train_cfg.seed), mesh)
    config = {"model": dataclasses.asdict(model_cfg), "grpo": dataclasses.asdict(grpo_cfg),
              "rollout": dataclasses.asdict(rollout_cfg), "train": dataclasses.asdict(train_cfg),
              "lora": policy.config_json()}
    log = RunLog(out, echo, make_loggers(list(train_cfg.log_to), str(out), config) if jax.process_index() == 0 else [])
    previous_config = log.previous_config()
    log.write_config(config)
    ckpt = TrainCheckpointer(out / "checkpoints", keep=train_cfg.keep_checkpoints)
    if aside:
        log.say(f"starting over: the previous run in {out} was moved to {aside} (delete it to free the space)")
    previous = log.previous_status()
    found, reference, opt_state = _restore_or_init(ckpt, policy, params, grpo_cfg, mesh, train_cfg.resume, log.say)
    ctx = RunContext(model_cfg, task, grpo_cfg, rollout_cfg, train_cfg, mesh, policy, frozen,
                     step_fn=_compiled_step(policy, grpo_cfg, mesh),
                     logprobs_fn=_compiled_logprobs(policy, grpo_cfg, mesh),
                     reference=reference, log=log, ckpt=ckpt, best=BestCheckpointer(out))
    state = LoopState(params, opt_state, level=level_mix.start_index(level_names(task), train_cfg.start_level))
    if found:
        step, state = found[0], _resumed_state(*found)
        ctx = with_learning_rate(ctx, grpo_cfg.learning_rate * state.lr_scale)
        ctx.log.say(f"resumed from {ctx.ckpt.directory}/{step} (data position {state.position})")
        if step >= train_cfg.steps:  # a finished run re-run, or one asked for fewer steps than it has
            ctx.log.say(f"nothing to train: the run is already at step {step} (steps: {train_cfg.steps})")
        changed = run_files.config_changes(previous_config, config)
        if changed:
            ctx.log.say(f"resumed with changed settings: {', '.join(changed)}")
    best = ctx.best.record(say=ctx.log.say) if train_cfg.resume else None
    if best:  # kept across resumes, even when it is newer than the rolling checkpoint resumed from
        state = dataclasses.replace(state, best_step=int(best["step"]), best_score=list(best["score"]))
    if previous and previous.get("state") == "running":
        ctx.log.say(run_files.unclean_stop_hint(previous))
    for note in ctx.log.rewind(state.step):
        ctx.log.say(f"repaired {note}")
    ctx.log.set_status("running", state.step)
    return ctx, state


def _restore_or_init(ckpt: TrainCheckpointer, policy: Policy, trained: dict, grpo_cfg: GRPOConfig, mesh: Mesh,
                     resume: bool, say: Callable[[str], None]) -> tuple[tuple | None, dict | None, object]:
    """(the checkpoint resumed from or None, the KL reference or None, a fresh optimizer state or None).

    Resumed, the checkpoint is restored into abstract shapes (no fresh Adam state beside it) and the fresh weights
    are the reference as they are, or are freed when there is none (they are consumed, as on a fresh start, where
    the step donates them). Fresh, the reference is a copy, since the step donates the trained tree."""
    found = None
    if resume:
        found = ckpt.restore_latest(trained, abstract_trained_state(policy, trained, grpo_cfg, mesh), say=say)
    if not found:
        reference = jax.tree.map(jnp.copy, trained) if grpo_cfg.beta > 0 else None
        return None, reference, init_trained_state(policy, trained, grpo_cfg, mesh)
    if grpo_cfg.beta > 0:
        return found, trained, None
    jax.tree.map(lambda x: x.delete(), trained)
    return found, None, None


def _resumed_state(step: int, params: dict, opt_state, record: dict) -> LoopState:
    """The loop's state as a checkpoint recorded it."""
    return LoopState(params, opt_state, step=step, position=int(record["data_position"]),
                     level=int(record.get("level", 0)), recent_solved=tuple(record.get("recent_solved", ())),
                     level_stats=tuple(LevelStats(*pair) for pair in record.get("level_stats", ())),
                     entropy_coef=float(record.get("entropy_coef", 0.0)),
                     last_entropy=record.get("last_entropy"), guard=GuardState.from_json(record.get("guard")),
                     lr_scale=float(record.get("lr_scale", 1.0)), bad_in_a_row=int(record.get("bad_in_a_row", 0)))


def with_learning_rate(ctx: RunContext, learning_rate: float) -> RunContext:
    """The context with the step compiled for another learning rate (the guard's rollback lowers it); the log-prob
    passes do not depend on it."""
    if learning_rate == ctx.grpo_cfg.learning_rate:
        return ctx
    grpo_cfg = dataclasses.replace(ctx.grpo_cfg, learning_rate=learning_rate)
    return dataclasses.replace(ctx, grpo_cfg=grpo_cfg, step_fn=_compiled_step(ctx.policy, grpo_cfg, ctx.mesh))


def rollout_phase(ctx: RunContext, state: LoopState) -> Rollout:
    """The next prompts of the data stream (from the levels the mix picks), G sampled completions each, scored and
    turned into a batch; with dynamic sampling, further rounds until the batch's groups have signal
    (grpo/dynamic_sampling.py). The rollout also holds every sampled row and the prompts taken from the stream."""
    p, g = ctx.train_cfg.prompts_per_step, ctx.grpo_cfg.num_generations
    key = jax.random.fold_in(jax.random.key(ctx.train_cfg.seed), state.step)
    policy = policy_params(ctx, state)
    shares = step_level_shares(ctx, state)

    def one_round(r: int) -> SampledRows:
        items = draw_items(ctx, state, shares, state.position + r * p, p, r)
        round_key = key if r == 0 else jax.random.fold_in(jax.random.fold_in(key, _ROUND_SALT), r)
        return sample_rows(policy, ctx.model_cfg, ctx.task, items, g, ctx.rollout_cfg, round_key)

    rounds = max_rounds(ctx.rollout_cfg.max_oversample) if ctx.rollout_cfg.dynamic_sampling else 1
    every, picked, used = sample_with_signal(one_round, p, g, rounds)
    metrics = {**rollout_metrics(every, g, ctx.task), **level_metrics(ctx, every, shares),
               "oversample_ratio": float(used)}
    rollout = make_rollout(picked, g, ctx.rollout_cfg, ctx.grpo_cfg.scale_rewards, ctx.model_cfg.pad_id, metrics)
    return dataclasses.replace(rollout, sampled=every, prompts_used=used * p)


# Dynamic sampling's round keys: past any sampler chunk index fold_in(key, i). A decode step's fold_in(.., t) can
# meet it (t = 213); the keys that meet are then split differently, so no two streams share draws. Kept as it is:
# recorded runs reproduce with it.
_ROUND_SALT = 0xD5


def logprob_phase(ctx: RunContext, params: dict, batch: dict) -> dict:
    """The batch on device, plus ref_logprobs (beta > 0) and old_logprobs (num_iterations > 1).

    With num_iterations == 1 the step uses stop_gradient(logp) as the old policy: ratio == 1, no extra pass.
    """
    if ctx.grpo_cfg.shared_prompt:  # the step reads each group's prompt from its first row only
        check_shared_prompts(batch, ctx.grpo_cfg.num_generations, ctx.grpo_cfg.logprob_tail)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rows = (batch["tokens"], batch["attention_mask"])
    if ctx.grpo_cfg.beta > 0:
        batch["ref_logprobs"] = ctx.logprobs_fn(ctx.frozen, ctx.reference, *rows)
    if ctx.grpo_cfg.num_iterations > 1:
        batch["old_logprobs"] = ctx.logprobs_fn(ctx.frozen, params, *rows)
    return batch


def update_phase(ctx: RunContext, params: dict, opt_state, batch: dict) -> tuple[dict, Any, dict[str, float]]:
    """num_iterations optimizer steps on one rollout batch; metrics of the last one, as Python floats."""
    metrics = {}
    for _ in range(ctx.grpo_cfg.num_iterations):
        params, opt_state, metrics = ctx.step_fn(ctx.frozen, params, opt_state, batch)
    return params, opt_state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_step(ctx: RunContext, state: LoopState) -> LoopState:
    """One GRPO step: rollout -> log-probs -> update -> logs. Returns the state after it."""
    rollout = rollout_phase(ctx, state)
    t0 = time.perf_counter()
    batch, entropy_metrics = _with_entropy_coef(ctx, state, rollout.batch)
    batch = logprob_phase(ctx, state.params, batch)
    params, opt_state, step_metrics = update_phase(ctx, state.params, state.opt_state, batch)
    train_s = time.perf_counter() - t0
    n_tokens = float(rollout.batch["attention_mask"].sum())
    metrics = {**rollout.metrics, **step_metrics, **entropy_metrics, "step": state.step + 1, "train_s": train_s,
               "train_tokens_per_s": n_tokens / train_s, "peak_rss_bytes": peak_rss_bytes()}
    metrics.setdefault("kl", None)  # JSON null when beta == 0: no reference pass ran, never a silent nan
    if not metrics.get("num_completion_tokens"):  # every group filtered out or truncated: no token measured it
        metrics["entropy"] = None
    if metrics.get("entropy") is not None:
        metrics["entropy_in_band"] = band_note(metrics["entropy"]) is None
    names = level_names(ctx.task)
    if names:
        metrics["level"] = names[state.level]
    record_step(ctx, metrics, rollout)
    skipped = bool(metrics.get("skipped", 0))
    entropy = None if skipped else metrics.get("entropy")
    # A step with no token to learn from because every group agreed is the collapse the bonus answers: the coefficient
    # rises as if entropy were below target; it still applies only while the last MEASURED entropy is below it.
    silent = not skipped and not metrics.get("num_completion_tokens") and metrics.get("frac_zero_std_groups") == 1
    ctrl, ctrl_entropy = ctx.grpo_cfg.entropy_control, 0.0 if silent else entropy
    state = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1,
                                position=state.position + rollout.prompts_used,
                                bad_in_a_row=state.bad_in_a_row + 1 if skipped else 0, last_metrics=metrics,
                                entropy_coef=next_coef(ctrl, state.entropy_coef, ctrl_entropy) if ctrl else 0.0,
                                last_entropy=entropy if entropy is not None else state.last_entropy)
    state = _watch(ctx, state, {"entropy": entropy, "nonfinite": float(state.bad_in_a_row)})
    return after_levels(ctx, state, rollout.sampled) if names else state


def _watch(ctx: RunContext, state: LoopState, values: dict) -> LoopState:
    """The guard's view of this step's or eval's values; an alarm is kept until the loop answers it."""
    guard, alarm = observe(ctx.train_cfg.guard, state.guard, state.step, values)
    return dataclasses.replace(state, guard=guard, alarm=state.alarm or alarm)


def _with_entropy_coef(ctx: RunContext, state: LoopState, batch: dict) -> tuple[dict, dict]:
    """The batch with the adaptive entropy bonus as a per-row array (the coefficient is data, so it never
    recompiles the step), and the coefficient applied, for the metrics. No controller: unchanged."""
    ctrl = ctx.grpo_cfg.entropy_control
    if ctrl is None:
        return batch, {}
    coef = applied_coef(ctrl, state.entropy_coef, state.last_entropy)
    rows = batch["advantages"].shape[0]
    return {**batch, "entropy_coef": np.full(rows, coef, np.float32)}, {"entropy_coef_applied": coef}


def record_step(ctx: RunContext, metrics: dict, rollout: Rollout) -> None:
    """metrics.jsonl, the first groups' completions in train_samples.jsonl, and the console line."""
    ctx.log.write("metrics.jsonl", metrics)
    ctx.log.scalars(metrics["step"], metrics)
    g = ctx.grpo_cfg.num_generations
    truncated = rollout.batch["truncated"]
    for r in range(min(len(rollout.items), ctx.train_cfg.sample_groups_per_step * g)):
        ctx.log.write("train_samples.jsonl", sample_record(ctx.task, metrics["step"], r // g, rollout.items[r],
                                                          rollout.scored[r], rollout.lengths[r], truncated[r]))
    ctx.log.say(console_line(metrics))


def eval_phase(ctx: RunContext, state: LoopState) -> LoopState:
    """Greedy eval at state.step: eval.jsonl, a few eval_samples.jsonl lines, the console line."""
    if ctx.train_cfg.eval_size <= 0:
        return state
    t0 = time.perf_counter()
    rows = min(EVAL_BATCH, ctx.rollout_cfg.batch_rows or EVAL_BATCH)  # no more per call than the plan's rollout
    metrics, samples = evaluate(policy_params(ctx, state), ctx.model_cfg, ctx.task, ctx.rollout_cfg,
                                batch_size=rows, think=ctx.train_cfg.eval_think)
    metrics["eval_s"] = time.perf_counter() - t0
    ctx.log.write("eval.jsonl", {"step": state.step, **metrics})
    ctx.log.scalars(state.step, metrics)
    for s in samples:
        if s["group"] < EVAL_SAMPLES_KEPT:  # the first few of each held-out set
            ctx.log.write("eval_samples.jsonl", {**s, "step": state.step})
    by_level = metrics.get("solved_by_level", {})
    levels = " | by level " + " ".join(f"{k} {v:.2f}" for k, v in by_level.items()) if len(by_level) > 1 else ""
    top = f"top level {list(by_level)[-1]}: " if len(by_level) > 1 else ""  # the headline numbers are its
    score, order = eval_score(metrics)
    improved = better(score, state.best_score)
    ctx.log.say(f"eval step {state.step}: {top}solved {metrics['eval_solved_frac']:.3f} "
                f"format {metrics['eval_format_frac']:.3f} reward {metrics['eval_reward_mean']:.3f}{levels} "
                f"({metrics['eval_s']:.1f}s)" + (" | best so far, saved to best/" if improved else ""))
    state = dataclasses.replace(state, last_eval=metrics)
    if improved:
        _save_best(ctx, state, score, order)
        state = dataclasses.replace(state, best_step=state.step, best_score=score)
    fmt = metrics.get("format_by_level") or {"": metrics["eval_format_frac"]}
    return _watch(ctx, state, {"format": float(np.mean(list(fmt.values()))),
                               "score": float(np.mean(list(by_level.values() or [metrics["eval_solved_frac"]])))})


def _save_best(ctx: RunContext, state: LoopState, score: list[float], order: list[str]) -> None:
    record = {"step": state.step, "score": score, "score_order": order, "data_position": state.position,
              "level": state.level, "lr_scale": state.lr_scale}
    try:
        ctx.best.save(state.step, state.params, state.opt_state, record)
    except Exception as e:  # noqa: BLE001 (an earlier async save's failure surfaces here, as any type)
        raise describe_write_failure(e, f"checkpoint {ctx.best.directory}") from None


def checkpoint_phase(ctx: RunContext, state: LoopState) -> None:
    """Save the state after state.step updates (asynchronously; orbax renames it into place when complete)."""
    if ctx.ckpt.latest_step() == state.step:  # already saved (a pause right after a periodic checkpoint)
        return
    record = {"step": state.step, "data_position": state.position, "seed": ctx.train_cfg.seed,
              "level": state.level, "recent_solved": list(state.recent_solved),
              "level_stats": [[st.solved, st.rows] for st in state.level_stats], "entropy_coef": state.entropy_coef,
              "last_entropy": state.last_entropy, "guard": state.guard.to_json(), "lr_scale": state.lr_scale,
              "bad_in_a_row": state.bad_in_a_row}
    try:
        ctx.ckpt.save(state.step, state.params, state.opt_state, record)
    except Exception as e:  # noqa: BLE001 (an earlier async save's failure surfaces here, as any type)
        raise describe_write_failure(e, f"checkpoint {ctx.ckpt.directory}") from None
    ctx.log.set_status("running", state.step)  # so a start after a kill names the step it got to


def finish_run(ctx: RunContext, state: LoopState, final_state: str = "finished", reason: str | None = None) -> None:
    """Wait for pending checkpoint writes, export the last params (final_hf/) and the best eval's (best_hf/) in the
    HF layout with the run's tokenizer (process 0), and write the final status with the best step and score."""
    exporting = ctx.train_cfg.export_hf and final_state != "paused"
    best = None
    for ckpt in (ctx.ckpt, ctx.best):
        try:
            if ckpt is ctx.best and exporting and state.best_step is not None:  # every process: orbax syncs them
                best = ckpt.restore(state.params, state.opt_state, say=ctx.log.say)  # waits for its write first
            ckpt.close()
        except Exception as e:  # noqa: BLE001 (the last async save's failure surfaces here, as any type)
            raise describe_write_failure(e, f"checkpoint {ckpt.directory}") from None
    tokenizer_file = getattr(getattr(ctx.task, "tokenizer", None), "file", None)
    out = Path(ctx.train_cfg.output_dir)
    if exporting:  # every process: the tensors are gathered across them, process 0 writes
        export_hf(out / "final_hf", ctx.model_cfg, policy_params(ctx, state), tokenizer_file)
    if exporting and best:
        export_hf(out / "best_hf", ctx.model_cfg, policy_params(ctx, dataclasses.replace(state, params=best[1])),
                  tokenizer_file)
    ctx.log.close()
    ctx.log.set_status(final_state, state.step, best_step=state.best_step, best_score=state.best_score, reason=reason)
    kept = "best_hf/" if exporting and best else "best/"  # best_hf/ is written when a run finishes
    ctx.log.say(f"{final_state} at step {state.step}; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
                + (f"; best held-out eval at step {state.best_step} ({kept})" if state.best_step is not None else ""))


def _due(step: int, every: int, last: int) -> bool:
    return step == last or bool(every) and step % every == 0


def train(model_cfg: GemmaConfig, params: dict, task: Task, grpo_cfg: GRPOConfig, rollout_cfg: RolloutConfig,
          train_cfg: TrainConfig, mesh: Mesh, echo: Callable[[str], None] = print,
          lora_cfg: LoraConfig | None = None) -> dict:
    """Run GRPO, fully fine-tuned or (LoRA settings of rank > 0) with adapters over the frozen params; returns the
    last step's metrics, the latest eval metrics, the final "params" (the trained tree: LoRA's adapters),
    "policy" (the weights the policy samples with: base + adapters merged, in the compute dtype) and "final_state"
    (finished, paused or stopped: status.json's)."""
    started = time.monotonic()  # --time_limit counts from here: the compiles and the step-0 eval too
    ctx, state = start_run(model_cfg, params, task, grpo_cfg, rollout_cfg, train_cfg, mesh, echo,
                           make_policy(model_cfg, lora_cfg))
    profiler = Profiler(train_cfg.profile_steps, Path(train_cfg.output_dir) / "profile", ctx.log.say)
    try:
        began = time.monotonic()
        if state.step == 0:
            state = eval_phase(ctx, state)
        eval_s = time.monotonic() - began  # the step-0 eval's time (0 on a resume) seeds the clock's eval cost
        ctx, state, final_state, reason = _run_steps(ctx, state, profiler, started, eval_s)
        finish_run(ctx, state, final_state, reason)
    except (Exception, KeyboardInterrupt) as e:  # a full disk, out of memory, a bug, a second Ctrl-C: so the next
        profiler.close()  # start does not blame the OOM killer
        if not isinstance(e, RunWriteError):  # a failed write is the error itself: nothing in flight to keep
            settle_checkpoints(ctx)
        last = (ctx.log.previous_status() or {}).get("step", state.step)  # the last checkpoint's (checkpoint_phase)
        why = {} if isinstance(e, KeyboardInterrupt) else {"reason": f"{type(e).__name__}: {str(e)[:300]}"}
        try:  # the disk may still refuse this small file
            ctx.log.set_status("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", last, **why)
        except OSError:
            pass
        raise
    return {**state.last_metrics, **state.last_eval, "params": state.params, "policy": policy_params(ctx, state),
            "final_state": final_state}


def settle_checkpoints(ctx: RunContext) -> None:
    """On the way out after an error: let a checkpoint write in flight finish (orbax renames it into place), so the
    error does not also cost the last checkpoint or best/; a write that fails now stays the error's footnote."""
    for ckpt in (ctx.ckpt, ctx.best):
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001, S110 (the disk that failed the run may fail this too)
            pass


def _run_steps(ctx: RunContext, state: LoopState, profiler: Profiler, started: float,
               eval_s: float) -> tuple[RunContext, LoopState, str, str | None]:
    """The steps from state.step to train_cfg.steps with their evals and checkpoints; returns the context (a
    rollback recompiles the step), the final state, how the run ends ("finished", "paused", or "stopped" by the
    guard) and why."""
    train_cfg = ctx.train_cfg
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)) if hasattr(x, "nbytes"))
    clock = StopClock(train_cfg.time_limit_s, start=started, checkpoint_bytes=state_bytes, eval_s=eval_s)
    final_state, reason = "finished", None
    try:
        while state.step < train_cfg.steps:
            eval_next = _due(state.step + 1, train_cfg.eval_every, train_cfg.steps)
            why = any_process_stops(clock.reason_to_stop(eval_next))  # every process pauses before the same step
            if why:
                ctx.log.say(f"pausing before step {state.step + 1}: {why}; checkpoint saved at step {state.step}, "
                            f"re-run the same command to continue")
                checkpoint_phase(ctx, state)
                final_state = "paused"
                break
            profiler.before(state.step)
            state = train_step(ctx, state)
            clock.step_done()
            profiler.after(state.step - 1)
            if not state.alarm and _due(state.step, train_cfg.eval_every, train_cfg.steps):
                with clock.evaluating():
                    state = eval_phase(ctx, state)
            if state.alarm:
                ctx, state, reason = answer_alarm(ctx, state)
                if reason:
                    final_state = "stopped"
                    break
            if _due(state.step, train_cfg.checkpoint_every, train_cfg.steps):
                # the pause writes one too: its cost is part of what must fit, the write's wait included (with a
                # limit only: otherwise the write overlaps the next step)
                with clock.checkpointing(ctx.ckpt.wait if train_cfg.time_limit_s else None):
                    checkpoint_phase(ctx, state)
    finally:
        profiler.close()
        clock.close()
    return ctx, state, final_state, reason


def answer_alarm(ctx: RunContext, state: LoopState) -> tuple[RunContext, LoopState, str | None]:
    """The guard fired: roll back to best/ with a lower learning rate (guard action "rollback", while rollbacks
    are left and a best exists), else stop with a checkpoint. Returns (context, state, the stop line or None)."""
    alarm, cfg = state.alarm, ctx.train_cfg.guard
    state = dataclasses.replace(state, alarm=None)
    found = None
    if cfg.action == "rollback" and state.guard.rollbacks < cfg.max_rollbacks and state.best_step is not None:
        found = ctx.best.restore(state.params, state.opt_state, say=ctx.log.say)
    if found:
        ctx = with_learning_rate(ctx, ctx.grpo_cfg.learning_rate * cfg.rollback_lr_factor)
        state = dataclasses.replace(state, params=found[1], opt_state=found[2], bad_in_a_row=0,
                                    lr_scale=state.lr_scale * cfg.rollback_lr_factor,
                                    guard=after_rollback(state.guard, alarm.metric))
        ctx.log.say(f"guard: {alarm.detail} since step {alarm.since}; rolled back to the best model (step "
                    f"{found[0]}) with learning rate {ctx.grpo_cfg.learning_rate:g} (rollback "
                    f"{state.guard.rollbacks} of {cfg.max_rollbacks})")
        # saved now: a resume from an older checkpoint would replay the alarm against a newer best/
        checkpoint_phase(ctx, state)
        ctx.ckpt.wait()
        return ctx, state, None
    where = (f"the best model is step {state.best_step}'s, in {ctx.best.directory} (best_hf/ after the export)"
             if state.best_step is not None else "no eval ran, so no best model was kept")
    line = f"guard: {alarm.detail} since step {alarm.since}; stopped after step {state.step}; {where}"
    ctx.log.say(line)
    checkpoint_phase(ctx, state)
    return ctx, state, line
