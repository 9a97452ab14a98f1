"""Timing the WHOLE GRPO step phase by phase, through the trainer's own phases (bin/bench_grpo).

`run_bench` builds the run as bin/train does (`start_run`, in a temporary output dir; nothing is evaluated or
checkpointed), then each step calls, as the trainer's `train_step` does: `rollout_phase` (TinyZero puzzles,
base template, temperature 1; rollouts run the whole budget unless stop_at_answer, as Tunix's did),
`logprob_phase` (the reference pass, in the step's own precision) and `update_phase` (the jitted step, AdamW).
The first step compiles, so it is the warm-up and is not counted. Per step: rollout / reference / update seconds
and their sum, and tokens/s: generated tokens per second of rollout, and batch tokens per second of reference +
update (metrics.jsonl's train_tokens_per_s). Full fine-tuning, float32, as our Tunix measurement was.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
from jax.sharding import Mesh

from data import puzzles
from grpo.config import GRPOConfig
from grpo.rollout import RolloutConfig
from grpo.tasks import CountdownTask
from grpo.trainer import TrainConfig, finish_run, logprob_phase, rollout_phase, start_run, update_phase
from model.config import GemmaConfig
from model.sampling import SamplingConfig

SECONDS = ("rollout_s", "reference_s", "update_s", "total_s")
RATES = ("rollout_tokens_per_s", "train_tokens_per_s")
LEARNING_RATE = 1e-6  # a GRPO-sized rate; the timings do not depend on it


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The benchmarked run: bin/bench_grpo's flags, field for field (the defaults: our Tunix measurement's shape)."""

    prompts: int = 4  # per step
    num_generations: int = 4  # completions per prompt (G)
    max_new_tokens: int = 64
    beta: float = 0.04  # > 0: the reference pass runs
    stop_at_answer: bool = False  # Tunix ran the whole budget
    remat: bool = False
    shared_prompt: bool = True
    repeats: int = 3  # timed steps after the warm-up
    num_micro_batches: int = 1
    rollout_batch_size: int = 0  # rows per sampler call (0: the whole batch)
    compute_dtype: str | None = None  # None: the params' float32

    def run_configs(self) -> tuple[GRPOConfig, RolloutConfig]:
        """(GRPOConfig, RolloutConfig): the one place the benchmarked run's settings are made. Every group stays in
        the loss and no entropy controller runs: the plain step, as measured before those existed."""
        rollout_cfg = RolloutConfig(max_new_tokens=self.max_new_tokens, sampling=SamplingConfig(temperature=1.0),
                                    stop_at_answer=self.stop_at_answer, skip_zero_std_groups=False,
                                    batch_rows=self.rollout_batch_size)
        grpo_cfg = GRPOConfig(num_generations=self.num_generations, beta=self.beta, learning_rate=LEARNING_RATE,
                              remat=self.remat, shared_prompt=self.shared_prompt, entropy_control=None,
                              num_micro_batches=self.num_micro_batches, compute_dtype=self.compute_dtype)
        return grpo_cfg, rollout_cfg


def load_tokenizer(model_dir: Path, model_cfg: GemmaConfig, bench: BenchConfig, devices: int = 1):
    """<model_dir>/tokenizer.model checked against the model, the run's configs and its rows against `devices` x
    the micro-batches, and the longest prompt run_bench feeds the sampler plus bench.max_new_tokens against its
    cache; before any weight loads. Bad input: a ValueError naming the flag (--model_dir for the tokenizer:
    bin/bench_grpo has no --tokenizer)."""
    from model.sampler import check_fits
    from model.tokenizer import load_for_model

    try:  # the configs name the field, which is the flag's name
        bench.run_configs()
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if (bench.prompts * bench.num_generations) % (devices * bench.num_micro_batches):
        raise ValueError(f"--num_micro_batches: {bench.prompts} x {bench.num_generations} rows do not split over "
                         f"{devices} device(s) x {bench.num_micro_batches} micro-batches")
    try:
        tokenizer = load_for_model(model_dir / "tokenizer.model", model_cfg)
    except ValueError as e:
        raise ValueError("--model_dir: " + str(e).removeprefix("--tokenizer: ")) from None
    task = _task(bench, tokenizer)
    check_fits(max(len(task.encode_prompt(it)) for it in task.train_items(0, len(task.train[0]))), bench.max_new_tokens)
    return tokenizer


def _task(bench: BenchConfig, tokenizer) -> CountdownTask:
    """run_bench's prompts: TinyZero puzzles, enough for the warm-up and the timed steps."""
    train, test = puzzles.make_splits(bench.prompts * (bench.repeats + 1), 1, 0)
    return CountdownTask(train=[train], test=[test], tokenizer=tokenizer)


def planned(bench: BenchConfig, machine, model_cfg: GemmaConfig, tokenizer, mesh: Mesh,
            given: dict[str, int]) -> tuple[BenchConfig, object]:
    """bench on `machine` (grpo/presets.py): its remat (unless `given` says, as an explicit --remat / --noremat),
    bf16 compute off-CPU unless the machine says float32, and the micro-batches and rows per sampler call its
    plan gives for this model and shape (grpo/planner.py). Returns (that bench, the plan)."""
    from grpo import planner
    from grpo.rollout import align_grpo_config

    backend = jax.default_backend()
    planner.check_platform(machine, backend)  # another platform's budget is not this machine's memory
    compute = "bfloat16" if backend != "cpu" and machine.dtype != "float32" else None
    bench = dataclasses.replace(bench, remat=given.get("remat", machine.remat), compute_dtype=compute)
    grpo_cfg, rollout_cfg = bench.run_configs()
    train, _ = puzzles.make_splits(64, 1, 0)
    task = CountdownTask(train=[train], test=[train[:1]], tokenizer=tokenizer)
    longest = max(len(task.encode_prompt(it)) for it in task.train_items(0, 64, level=0))
    plan = planner.plan_run(machine, model_cfg, align_grpo_config(grpo_cfg, rollout_cfg), mesh, lora_cfg=None,
                            param_dtype=jax.numpy.float32, rows=bench.prompts * bench.num_generations,
                            prompt_len=longest, new_tokens=bench.max_new_tokens,
                            stop_states=len("</answer>") if bench.stop_at_answer else 1, backend=backend, given=given)
    return dataclasses.replace(bench, num_micro_batches=plan.num_micro_batches,
                               rollout_batch_size=plan.rollout_rows), plan


def timed_step(ctx, state):
    """One step through the trainer's phases: (its timings and token counts, the state after it)."""
    t0 = time.perf_counter()
    rollout = rollout_phase(ctx, state)
    t1 = time.perf_counter()
    batch = jax.block_until_ready(logprob_phase(ctx, state.params, rollout.batch))
    t2 = time.perf_counter()
    params, opt_state, _ = update_phase(ctx, state.params, state.opt_state, batch)  # metrics as floats: waits
    t3 = time.perf_counter()
    completion, tokens = int(rollout.lengths.sum()), int(rollout.batch["attention_mask"].sum())
    row = {"rollout_s": t1 - t0, "reference_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0,
           "completion_tokens": completion, "tokens": tokens, "rollout_tokens_per_s": completion / (t1 - t0),
           "train_tokens_per_s": tokens / (t3 - t1)}
    state = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1,
                                position=state.position + rollout.prompts_used)
    return row, state


def run_bench(model_cfg: GemmaConfig, params: dict, tokenizer, bench: BenchConfig, mesh: Mesh,
              on_step: Callable[[int, dict], None]) -> list[dict]:
    """The warm-up step and `repeats` timed ones on TinyZero puzzles; on_step(i, row) after each (i = 0: the
    warm-up). Returns the timed rows."""
    task = _task(bench, tokenizer)
    grpo_cfg, rollout_cfg = bench.run_configs()
    timings = []
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as out:
        train_cfg = TrainConfig(output_dir=out, steps=bench.repeats + 1, prompts_per_step=bench.prompts,
                                eval_size=0, resume=False, export_hf=False)
        ctx, state = start_run(model_cfg, params, task, grpo_cfg, rollout_cfg, train_cfg, mesh, echo=lambda s: None)
        for i in range(bench.repeats + 1):
            row, state = timed_step(ctx, state)
            on_step(i, row)
            if i:
                timings.append(row)
        finish_run(ctx, state)
    return timings


def medians(timings: list[dict]) -> dict:
    """The median of every seconds and rate column."""
    return {k: statistics.median(t[k] for t in timings) for k in (*SECONDS, *RATES)}


def format_row(row: dict) -> str:
    """One step's (or the medians') console line."""
    unit = lambda k: " s" if k in SECONDS else " tok/s" if k in RATES else ""
    return ", ".join(f"{k} {v:.2f}{unit(k)}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
