"""The GRPO training loop, as phases a test can call one at a time.

One step (`train_step`) runs, in order:
    rollout_phase     sample G completions per prompt, score them, build the batch (grpo.rollout)
    logprob_phase     reference / old-policy log-probs, only when the objective needs them
    update_phase      num_iterations calls of the jitted, sharded step
    record_step       metrics.jsonl, train_samples.jsonl and the console line
and around the steps: `start_run` (init, resume), `eval_phase` (greedy eval on the held-out set),
`checkpoint_phase`, `Profiler` (jax.profiler over --profile_steps) and `finish_run` (close, HF export).

Resumability: everything random is derived from (seed, step) with `fold_in`, and the data stream is a pure
function of (seed, position), so restoring params, optimizer state, step and data position from the last
checkpoint continues the exact trajectory of a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import grpo
import model
from grpo.checkpoints import TrainCheckpointer
from grpo.config import GRPOConfig
from grpo.evaluation import evaluate
from grpo.loggers import make_loggers
from grpo.logprobs import cast_params, make_step_logprobs
from grpo.lora_step import init_lora_state, make_lora_step
from grpo.rollout import (
    Rollout,
    RolloutConfig,
    align_grpo_config,
    check_shared_prompts,
    sample_groups,
    sample_record,
)
from grpo.run_files import RunLog, RunWriteError, describe_write_failure, peak_rss_bytes
from grpo.tasks import Task
from model.config import GemmaConfig
from model.lora import LoraConfig, init_adapters, merge

EVAL_SAMPLES_KEPT = 8  # eval completions per held-out set written to eval_samples.jsonl per eval


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop around the GRPO step: length, eval, checkpoints, profiling, export."""

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
    time_limit_s: float | None = None  # pause (checkpoint, exit cleanly) before a step would end past this
    sample_groups_per_step: int = 4  # prompts whose G completions go to train_samples.jsonl each step
    export_hf: bool = True  # write the final params as an HF checkpoint dir (final_hf/)
    log_to: tuple[str, ...] = ()  # also send the numbers to "tensorboard" and/or "wandb" (grpo/loggers.py)
    # Difficulty ladder (tasks with level_names): move up a level once the sampled solved rate of the current
    # level, averaged over the last promote_window steps, reaches promote_at. Never down.
    promote_at: float = 0.35
    promote_window: int = 4


@dataclasses.dataclass
class LoopState:
    """What changes from step to step. (params, opt_state, step, position) is what a checkpoint holds."""

    params: dict
    opt_state: Any
    step: int = 0  # GRPO steps done (rollout batches consumed); the next step is step + 1
    position: int = 0  # prompts consumed from the data stream
    bad_in_a_row: int = 0  # consecutive non-finite (skipped) steps
    level: int = 0  # difficulty level feeding the rollouts (index into task.level_names)
    recent_solved: tuple[float, ...] = ()  # sampled solved rates of the last steps at this level (promotion)
    last_metrics: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What stays fixed for a run: configs, the task, the mesh, compiled functions, the reference model, I/O."""

    model_cfg: GemmaConfig
    task: Task
    grpo_cfg: GRPOConfig  # aligned with rollout_cfg (align_grpo_config)
    rollout_cfg: RolloutConfig
    train_cfg: TrainConfig
    mesh: Mesh
    step_fn: Callable  # full: (params, opt, batch); LoRA: (adapters, opt, batch, base)
    ref_logprobs_fn: Callable  # (params, tokens, mask): the reference policy's log-probs
    old_logprobs_fn: Callable  # full: (params, tokens, mask); LoRA: (base, adapters, tokens, mask)
    ref_params: dict | None  # the frozen starting policy, kept when the KL term is on (LoRA: the base itself)
    log: RunLog
    ckpt: TrainCheckpointer
    lora_cfg: LoraConfig | None = None  # None: full fine-tuning; else LoopState.params holds the adapters
    base_params: dict | None = None  # LoRA: the frozen base model, read by every phase, never updated


@functools.lru_cache(maxsize=8)
def _compiled_fns(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, lora_cfg: LoraConfig | None, mesh: Mesh):
    """(step, reference log-probs, old-policy log-probs), made once per (model, GRPO config, LoRA, mesh): a
    resumed run in the same process (tests, notebooks) reuses the compiled code. The log-prob passes are the
    step's own function (same compute dtype, chunks, micro-batches), so iteration 1 has ratio exactly 1 and a
    step at the reference has KL exactly 0."""
    ref = make_step_logprobs(model_cfg, grpo_cfg, mesh)  # LoRA: the base alone is the reference
    if lora_cfg is None:
        return grpo.make_step(model_cfg, grpo_cfg, mesh), ref, ref
    return (make_lora_step(model_cfg, lora_cfg, grpo_cfg, mesh), ref,
            make_step_logprobs(model_cfg, grpo_cfg, mesh, lora_cfg=lora_cfg))


def policy_params(ctx: RunContext, state: LoopState) -> dict:
    """The params the policy samples and evaluates with: base + adapters merged once (LoRA), else the params; in
    the step's compute dtype (bf16 compute samples from a bf16 copy: half the weight and KV-cache bytes)."""
    params = state.params if ctx.lora_cfg is None else merge(ctx.base_params, state.params, ctx.model_cfg,
                                                             ctx.lora_cfg)
    return cast_params(params, ctx.grpo_cfg.compute_dtype)


def start_run(model_cfg: GemmaConfig, params: dict, task: Task, grpo_cfg: GRPOConfig, rollout_cfg: RolloutConfig,
              train_cfg: TrainConfig, mesh: Mesh, echo: Callable[[str], None] = print,
              lora_cfg: LoraConfig | None = None) -> tuple[RunContext, LoopState]:
    """Place params on the mesh, build the optimizer state, and restore the latest checkpoint if resuming.

    With lora_cfg (rank > 0) the given params become the frozen base and the trained state is fresh adapters
    (b = 0, drawn from the run's seed); the optimizer state holds adapter moments only.
    """
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    grpo_cfg = align_grpo_config(grpo_cfg, rollout_cfg)
    lora_cfg = lora_cfg if lora_cfg is not None and lora_cfg.rank > 0 else None
    base = None
    if lora_cfg is None:
        params, opt_state = grpo.init_train_state(params, model_cfg, grpo_cfg, mesh)
        ref_params = jax.tree.map(jnp.copy, params) if grpo_cfg.beta > 0 else None
    else:
        base = ref_params = grpo.place_params(params, model_cfg, mesh)
        adapters = init_adapters(jax.random.key(train_cfg.seed), model_cfg, lora_cfg)
        params, opt_state = init_lora_state(adapters, model_cfg, lora_cfg, grpo_cfg, mesh)
    config = {"model": dataclasses.asdict(model_cfg), "grpo": dataclasses.asdict(grpo_cfg),
              "rollout": dataclasses.asdict(rollout_cfg), "train": dataclasses.asdict(train_cfg),
              "lora": dataclasses.asdict(lora_cfg) if lora_cfg else None}
    log = RunLog(out, echo, make_loggers(list(train_cfg.log_to), str(out), config) if jax.process_index() == 0 else [])
    log.write_config(config)
    ckpt = TrainCheckpointer(out / "checkpoints", keep=train_cfg.keep_checkpoints)
    ctx = RunContext(model_cfg, task, grpo_cfg, rollout_cfg, train_cfg, mesh,
                     *_compiled_fns(model_cfg, grpo_cfg, lora_cfg, mesh), ref_params, log, ckpt, lora_cfg, base)
    state = LoopState(params, opt_state)
    previous = ctx.log.previous_status()
    found = ctx.ckpt.restore_latest(params, opt_state, say=ctx.log.say) if train_cfg.resume else None
    if found:
        step, params, opt_state, record = found
        state = LoopState(params, opt_state, step=step, position=int(record["data_position"]),
                          level=int(record.get("level", 0)), recent_solved=tuple(record.get("recent_solved", ())))
        ctx.log.say(f"resumed from {ctx.ckpt.directory}/{step} (data position {state.position})")
    if previous and previous.get("state") == "running":
        ctx.log.say(_unclean_stop_hint(previous))
    for note in ctx.log.rewind(state.step):
        ctx.log.say(f"repaired {note}")
    ctx.log.set_status("running", state.step)
    return ctx, state


def _unclean_stop_hint(previous: dict) -> str:
    """What to say when the previous process died without its final line (status still "running")."""
    rss = previous.get("peak_rss_bytes")
    used = f" (peak RSS {rss / 2**30:.1f} GiB when it last wrote its status)" if rss else ""
    return (f"the previous run stopped without finishing after step {previous.get('step', '?')}{used}; if the "
            f"OOM killer ended it, lower the memory: --remat, more --num_micro_batches, fewer --prompts_per_step "
            f"or --num_generations")


def rollout_phase(ctx: RunContext, state: LoopState) -> Rollout:
    """The next prompts of the data stream, G sampled completions each, scored and turned into a batch."""
    if _level_names(ctx.task):
        items = ctx.task.train_items(state.position, ctx.train_cfg.prompts_per_step, level=state.level)
    else:
        items = ctx.task.train_items(state.position, ctx.train_cfg.prompts_per_step)
    key = jax.random.fold_in(jax.random.key(ctx.train_cfg.seed), state.step)
    return sample_groups(policy_params(ctx, state), ctx.model_cfg, ctx.task, items, ctx.grpo_cfg.num_generations,
                         ctx.rollout_cfg, key, ctx.grpo_cfg.scale_rewards)


def logprob_phase(ctx: RunContext, params: dict, batch: dict) -> dict:
    """The batch on device, plus ref_logprobs (beta > 0) and old_logprobs (num_iterations > 1).

    With num_iterations == 1 the step uses stop_gradient(logp) as the old policy: ratio == 1, no extra pass.
    """
    if ctx.grpo_cfg.shared_prompt:  # the step reads each group's prompt from its first row only
        check_shared_prompts(batch, ctx.grpo_cfg.num_generations, ctx.grpo_cfg.logprob_tail)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rows = (batch["tokens"], batch["attention_mask"])
    if ctx.grpo_cfg.beta > 0:
        batch["ref_logprobs"] = ctx.ref_logprobs_fn(ctx.ref_params, *rows)
    if ctx.grpo_cfg.num_iterations > 1:
        trained = (params,) if ctx.lora_cfg is None else (ctx.base_params, params)
        batch["old_logprobs"] = ctx.old_logprobs_fn(*trained, *rows)
    return batch


def update_phase(ctx: RunContext, params: dict, opt_state, batch: dict) -> tuple[dict, Any, dict[str, float]]:
    """num_iterations optimizer steps on one rollout batch; metrics of the last one, as Python floats."""
    metrics = {}
    frozen = () if ctx.lora_cfg is None else (ctx.base_params,)
    for _ in range(ctx.grpo_cfg.num_iterations):
        params, opt_state, metrics = ctx.step_fn(params, opt_state, batch, *frozen)
    return params, opt_state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_step(ctx: RunContext, state: LoopState) -> LoopState:
    """One GRPO step: rollout -> log-probs -> update -> logs. Returns the state after it."""
    rollout = rollout_phase(ctx, state)
    t0 = time.perf_counter()
    batch = logprob_phase(ctx, state.params, rollout.batch)
    params, opt_state, step_metrics = update_phase(ctx, state.params, state.opt_state, batch)
    train_s = time.perf_counter() - t0
    n_tokens = float(rollout.batch["attention_mask"].sum())
    metrics = {**rollout.metrics, **step_metrics, "step": state.step + 1, "train_s": train_s,
               "train_tokens_per_s": n_tokens / train_s, "peak_rss_bytes": peak_rss_bytes()}
    metrics.setdefault("kl", None)  # JSON null when beta == 0: no reference pass ran, never a silent nan
    names = _level_names(ctx.task)
    if names:
        metrics["level"] = names[state.level]
    record_step(ctx, metrics, rollout)
    skipped = bool(metrics.get("skipped", 0))
    state = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1,
                                position=state.position + ctx.train_cfg.prompts_per_step,
                                bad_in_a_row=state.bad_in_a_row + 1 if skipped else 0, last_metrics=metrics)
    return promote(ctx, state, metrics["solved_frac"]) if names else state


def _level_names(task: Task) -> tuple[str, ...]:
    return tuple(getattr(task, "level_names", ()) or ())


def promote(ctx: RunContext, state: LoopState, solved_frac: float) -> LoopState:
    """Record this step's solved rate at the current level; move up once the last promote_window steps average
    at least promote_at (the window starts afresh on the new level)."""
    window, names = ctx.train_cfg.promote_window, _level_names(ctx.task)
    recent = (*state.recent_solved, solved_frac)[-window:]
    if len(recent) == window and np.mean(recent) >= ctx.train_cfg.promote_at and state.level + 1 < len(names):
        ctx.log.say(f"promoted to level {names[state.level + 1]} after step {state.step} (solved rate "
                    f"{np.mean(recent):.2f} over the last {window} steps at {names[state.level]})")
        return dataclasses.replace(state, level=state.level + 1, recent_solved=())
    return dataclasses.replace(state, recent_solved=recent)


def record_step(ctx: RunContext, metrics: dict, rollout: Rollout) -> None:
    """metrics.jsonl, the first groups' completions in train_samples.jsonl, and the console line."""
    ctx.log.write("metrics.jsonl", metrics)
    ctx.log.scalars(metrics["step"], metrics)
    g = ctx.grpo_cfg.num_generations
    truncated = rollout.batch["truncated"]
    for r in range(min(len(rollout.items), ctx.train_cfg.sample_groups_per_step * g)):
        ctx.log.write("train_samples.jsonl", sample_record(ctx.task, metrics["step"], r // g, rollout.items[r],
                                                          rollout.scored[r], rollout.lengths[r], truncated[r]))
    ctx.log.say(_console_line(metrics))


def eval_phase(ctx: RunContext, state: LoopState) -> LoopState:
    """Greedy eval at state.step: eval.jsonl, a few eval_samples.jsonl lines, the console line."""
    if ctx.train_cfg.eval_size <= 0:
        return state
    t0 = time.perf_counter()
    metrics, samples = evaluate(policy_params(ctx, state), ctx.model_cfg, ctx.task, ctx.rollout_cfg)
    metrics["eval_s"] = time.perf_counter() - t0
    ctx.log.write("eval.jsonl", {"step": state.step, **metrics})
    ctx.log.scalars(state.step, {k: v for k, v in metrics.items() if k != "solved_by_level"})
    for s in samples:
        if s["group"] < EVAL_SAMPLES_KEPT:  # the first few of each held-out set
            ctx.log.write("eval_samples.jsonl", {**s, "step": state.step})
    by_level = metrics.get("solved_by_level", {})
    levels = " | by level " + " ".join(f"{k} {v:.2f}" for k, v in by_level.items()) if len(by_level) > 1 else ""
    ctx.log.say(f"eval step {state.step}: solved {metrics['eval_solved_frac']:.3f} "
                f"format {metrics['eval_format_frac']:.3f} reward {metrics['eval_reward_mean']:.3f}{levels} "
                f"({metrics['eval_s']:.1f}s)")
    return dataclasses.replace(state, last_eval=metrics)


def checkpoint_phase(ctx: RunContext, state: LoopState) -> None:
    """Save the state after state.step updates (asynchronously; orbax renames it into place when complete)."""
    if ctx.ckpt.latest_step() == state.step:  # already saved (a pause right after a periodic checkpoint)
        return
    record = {"step": state.step, "data_position": state.position, "seed": ctx.train_cfg.seed,
              "level": state.level, "recent_solved": list(state.recent_solved)}
    try:
        ctx.ckpt.save(state.step, state.params, state.opt_state, record)
    except Exception as e:  # noqa: BLE001 (an earlier async save's failure surfaces here, as any type)
        raise describe_write_failure(e, f"checkpoint {ctx.ckpt.directory}") from None


def finish_run(ctx: RunContext, state: LoopState, final_state: str = "finished") -> None:
    """Wait for pending checkpoint writes, export the final params in the HF layout with the run's tokenizer
    (process 0), and write the final status line with the peak RSS."""
    try:
        ctx.ckpt.close()
    except Exception as e:  # noqa: BLE001 (the last async save's failure surfaces here, as any type)
        raise describe_write_failure(e, f"checkpoint {ctx.ckpt.directory}") from None
    export = Path(ctx.train_cfg.output_dir) / "final_hf"
    if ctx.train_cfg.export_hf and final_state != "paused" and jax.process_index() == 0:
        try:
            model.save_hf_checkpoint(export, ctx.model_cfg, policy_params(ctx, state))
            tokenizer_file = getattr(getattr(ctx.task, "tokenizer", None), "file", None)
            target = export / "tokenizer.model"
            # the export loads alone (bin/sample, bin/pass_at_k --model_dir); a run started from its own export
            # already reads its tokenizer from there
            if tokenizer_file is not None and Path(tokenizer_file).resolve() != target.resolve():
                shutil.copyfile(tokenizer_file, target)
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error type for I/O)
            raise describe_write_failure(e, str(export)) from None
    ctx.log.close()
    ctx.log.set_status(final_state, state.step)
    ctx.log.say(f"{final_state} at step {state.step}; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


class Profiler:
    """jax.profiler.trace over loop steps A..B, counted from 0 (loop step A writes step=A+1 in metrics.jsonl),
    into <output_dir>/profile."""

    def __init__(self, window: tuple[int, int] | None, out: Path):
        self.window, self.out, self.active = window, out, False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(str(self.out))
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _due(step: int, every: int, last: int) -> bool:
    return step == last or bool(every) and step % every == 0


def train(model_cfg: GemmaConfig, params: dict, task: Task, grpo_cfg: GRPOConfig, rollout_cfg: RolloutConfig,
          train_cfg: TrainConfig, mesh: Mesh, echo: Callable[[str], None] = print,
          lora_cfg: LoraConfig | None = None) -> dict:
    """Run GRPO; returns the last step's metrics, the latest eval metrics and the final "params" (LoRA: the
    adapters; "policy" holds base + adapters merged)."""
    ctx, state = start_run(model_cfg, params, task, grpo_cfg, rollout_cfg, train_cfg, mesh, echo, lora_cfg)
    profiler = Profiler(train_cfg.profile_steps, Path(train_cfg.output_dir) / "profile")
    try:
        if state.step == 0:
            state = eval_phase(ctx, state)
        state, final_state = _run_steps(ctx, state, profiler)
        finish_run(ctx, state, final_state)
    except RunWriteError:
        profiler.close()
        try:  # so the next start does not blame the OOM killer; the disk may still refuse this small file
            ctx.log.set_status("failed", state.step)
        except OSError:
            pass
        raise
    out = {**state.last_metrics, **state.last_eval, "params": state.params}
    return out if ctx.lora_cfg is None else {**out, "policy": policy_params(ctx, state)}


def _run_steps(ctx: RunContext, state: LoopState, profiler: Profiler) -> tuple[LoopState, str]:
    """The steps from state.step to train_cfg.steps with their evals and checkpoints; returns the final state and
    how the run ends ("finished", or "stopped" after max_bad_steps non-finite steps in a row)."""
    train_cfg = ctx.train_cfg
    final_state = "finished"
    clock = StopClock(train_cfg.time_limit_s)
    while state.step < train_cfg.steps:
        reason = clock.reason_to_stop()
        if reason:
            ctx.log.say(f"pausing before step {state.step + 1}: {reason}; checkpoint saved at step {state.step}, "
                        f"re-run the same command to continue")
            checkpoint_phase(ctx, state)
            final_state = "paused"
            break
        profiler.before(state.step)
        state = train_step(ctx, state)
        clock.step_done()
        profiler.after(state.step - 1)
        if state.bad_in_a_row >= train_cfg.max_bad_steps:
            ctx.log.say(f"stopping: {state.bad_in_a_row} non-finite steps in a row; state saved at step {state.step}")
            checkpoint_phase(ctx, state)
            final_state = "stopped"
            break
        if _due(state.step, train_cfg.eval_every, train_cfg.steps):
            state = eval_phase(ctx, state)
        if _due(state.step, train_cfg.checkpoint_every, train_cfg.steps):
            checkpoint_phase(ctx, state)
    profiler.close()
    clock.close()
    return state, final_state


class StopClock:
    """When to pause a run early, checkpointed, so re-running the same command continues: on SIGTERM (notebook
    and cluster shutdowns send it first), or when the next step would not end before the time limit (free
    notebooks end sessions after 9-12 h). The signal only sets a flag; the step in flight finishes first."""

    MARGIN = 2.0  # the next step must fit twice over: steps vary, and the checkpoint write needs time too

    def __init__(self, time_limit_s: float | None):
        self.start, self.limit, self.longest, self.signalled = time.monotonic(), time_limit_s, 0.0, False
        self._last = self.start
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def step_done(self) -> None:
        now = time.monotonic()
        self.longest, self._last = max(self.longest, now - self._last), now

    def reason_to_stop(self) -> str | None:
        if self.signalled:
            return "SIGTERM received"
        if self.limit is not None and time.monotonic() - self.start + self.MARGIN * self.longest > self.limit:
            return f"the next step would end past --time_limit ({self.limit:.0f} s)"
        return None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _console_line(m: dict) -> str:
    kl = "   -   " if m.get("kl") is None else f"{m['kl']:.4f}"
    return (f"step {m['step']:4d} | reward {m['reward_mean']:.3f} solved {m['solved_frac']:.2f} "
            f"format {m['format_frac']:.2f} | len {m['completion_len_mean']:5.1f} | kl {kl} "
            f"clip {m.get('clip_frac', 0.0):.3f} | aha {int(m['aha_count'])} | sample {m['sample_s']:.1f}s "
            f"train {m['train_s']:.1f}s | {m['sample_tokens_per_s']:.0f} tok/s"
            + (" | SKIPPED (non-finite)" if m.get("skipped") else ""))
