"""Timing the GRPO training step alone on a GRPO-shaped batch (bin/bench_train; BUILD.md "Training-step speed").

The batch is groups of `num_generations` rows with the same prompt columns (random ids, numpy seed 0), so the
step's shared-prompt path (GRPOConfig.shared_prompt) runs each group's prompt once, as in training. Each step is
compiled from abstract shapes first (grpo.step.abstract_step_inputs), so XLA's memory analysis can refuse a
shape that cannot fit BEFORE any weight is allocated (`check_fits`). Timing: the first call (the warm-up, which
also loads the executable) is reported apart; then the median of `repeats` timed steps. Full fine-tuning through
the one-policy interface (grpo/policy.py): the trained params and Adam state donated and returned each step.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo import planner, sharding
from grpo.config import GRPOConfig
from grpo.policy import init_policy_state, make_policy
from grpo.step import abstract_step_inputs, make_policy_step
from model.config import GemmaConfig

FIRST_ID = 4  # random prompt ids start past pad / eos / bos / unk
MAX_ID = 1000  # ... and stay among the common pieces
TAILS = ("0", "completion")  # log-probs on every position, or on the completion tail only (what bin/train does)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The benchmarked batch: rows of prompt + completion tokens, in groups sharing their prompt."""

    rows: int
    prompt_len: int
    completion_len: int
    num_generations: int

    @property
    def length(self) -> int:
        return self.prompt_len + self.completion_len


def check_tails(tails: list[str], compare_hf: bool) -> None:
    """bin/bench_train's --tails, a ValueError naming the flag unless it lists one or both TAILS, each once, and
    (with --compare_hf, which times HF on the completion tail) the completion tail among them."""
    if not tails or set(tails) - set(TAILS) or len(set(tails)) < len(tails):
        raise ValueError(f"--tails: give one or both of {', '.join(TAILS)}, got {','.join(tails) or 'none'}")
    if compare_hf and "completion" not in tails:
        raise ValueError("--compare_hf: compares the completion tail; keep 'completion' in --tails")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(peak: int, what: str, flags_named: str) -> None:
    """A ValueError naming the flags when `peak` bytes exceed what this machine has available now."""
    avail = available_bytes()
    if peak > avail:
        raise ValueError(f"{flags_named}: {what} needs about {peak / 2**30:.1f} GiB (XLA's memory analysis) but "
                         f"{avail / 2**30:.1f} GiB is available; use fewer rows / shorter sequences, or --remat")


def compile_step(model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, shape: StepShape, label: str):
    """Full fine-tuning's step compiled from abstract params, optimizer state and batch (nothing allocated), and
    refused (a ValueError naming the shape's flags) where it cannot fit this machine's memory. label: which step
    (bin/bench_train's tail), for the message."""
    policy = make_policy(model_cfg)
    inputs = abstract_step_inputs(policy, grpo_cfg, mesh, shape.rows, shape.length)
    step = make_policy_step(policy, grpo_cfg, mesh).lower(*inputs).compile()
    check_fits(planner.compiled_peak_bytes(step), f"a step of {shape.rows} rows x {shape.length} tokens ({label})",
               "--rows/--prompt_len/--completion_len")
    return step


def grpo_batch(model_cfg: GemmaConfig, shape: StepShape, mesh: Mesh) -> dict:
    """The step's batch on the mesh: random tokens whose prompt columns repeat per group, completion mask on the
    completion columns, normal advantages."""
    rng = np.random.default_rng(0)
    t, g = shape.length, shape.num_generations
    tokens = rng.integers(FIRST_ID, min(MAX_ID, model_cfg.vocab_size), (shape.rows, t))
    tokens[:, : shape.prompt_len] = np.repeat(tokens[::g, : shape.prompt_len], g, axis=0)
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "attention_mask": jnp.ones((shape.rows, t), jnp.int32),
        "completion_mask": jnp.asarray(np.arange(t)[None].repeat(shape.rows, 0) >= shape.prompt_len, jnp.int32),
        "advantages": jnp.asarray(rng.normal(size=shape.rows), jnp.float32),
    }
    return {k: jax.device_put(v, jax.NamedSharding(mesh, sharding.batch_spec(v.ndim))) for k, v in batch.items()}


def _timed(step, frozen, trained, opt_state, batch):
    t0 = time.perf_counter()
    trained, opt_state, metrics = step(frozen, trained, opt_state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0, trained, opt_state


def time_step(step, params: dict, model_cfg: GemmaConfig, grpo_cfg: GRPOConfig, mesh: Mesh, batch: dict,
              repeats: int, trace_dir: Path | None = None) -> dict:
    """One warm-up step then `repeats` timed ones from a copy of `params` (the step donates its state); with
    trace_dir, the timed steps are traced with jax.profiler there, the compiled HLO saved beside as step.hlo.txt.
    Returns bin/bench_train's per-tail JSON: step_s (median), steps_s, first_step_s, tokens_per_s, peak_bytes."""
    frozen, trained, opt_state = init_policy_state(make_policy(model_cfg), jax.tree.map(jnp.copy, params), None,
                                                   grpo_cfg, mesh)
    first_s, trained, opt_state = _timed(step, frozen, trained, opt_state, batch)
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        (trace_dir / "step.hlo.txt").write_text(step.as_text())
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    times = []
    for _ in range(repeats):
        seconds, trained, opt_state = _timed(step, frozen, trained, opt_state, batch)
        times.append(seconds)
    if trace_dir is not None:
        jax.profiler.stop_trace()
    med = statistics.median(times)
    tokens = batch["tokens"].size
    return {"step_s": med, "steps_s": times, "first_step_s": first_s, "tokens_per_s": tokens / med,
            "peak_bytes": planner.compiled_peak_bytes(step)}


def compare_to_hf(timing: dict, hf: dict) -> str:
    """Sets timing's ratio_to_hf (step seconds, ours / HF transformers', same invocation); returns the line."""
    timing["ratio_to_hf"] = timing["step_s"] / hf["step_s"]
    return (f"ours / HF (completion tail): {timing['ratio_to_hf']:.2f}x "
            f"({timing['step_s']:.2f} s vs {hf['step_s']:.2f} s, same invocation)")
