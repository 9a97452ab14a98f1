"""Greedy evaluation on fixed held-out sets: the numbers a learning claim rests on.

Every eval decodes greedily (temperature 0) with the same token budget and stop rule as the rollouts. A task
with a difficulty ladder (`level_names`) is evaluated on EVERY level's held-out set, easiest first, into
`solved_by_level`; the headline `eval_solved_frac` / `eval_format_frac` / `eval_reward_mean` are the top
level's (TinyZero's difficulty and reward), so runs with and without a curriculum compare on the same footing.
"""

from __future__ import annotations

import jax
import numpy as np

import model
from grpo.rollout import RolloutConfig, sample_record, score_rows, task_stop_table
from grpo.tasks import Task
from model.config import GemmaConfig

EVAL_BATCH = 64  # held-out prompts per greedy generate call


def evaluate_items(params: dict, model_cfg: GemmaConfig, task: Task, items: list, rollout_cfg: RolloutConfig,
                   batch_size: int = EVAL_BATCH) -> list[dict]:
    """Greedy completions of `items`, scored, as sample records (step 0; the caller sets it)."""
    records = []
    stop_table = task_stop_table(task, rollout_cfg)
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        res = model.generate(params, model_cfg, [task.encode_prompt(it) for it in chunk], jax.random.key(0),
                             max_new_tokens=rollout_cfg.max_new_tokens, temperature=0.0, eos_ids=task.eos_ids,
                             stop_table=stop_table)
        scored = score_rows(task, chunk, np.asarray(res.tokens), np.asarray(res.lengths))
        records += [sample_record(task, 0, lo + i, it, s, n, t) for i, (it, s, n, t)
                    in enumerate(zip(chunk, scored, np.asarray(res.lengths), np.asarray(res.truncated), strict=True))]
    return records


def evaluate(params: dict, model_cfg: GemmaConfig, task: Task, rollout_cfg: RolloutConfig,
             batch_size: int = EVAL_BATCH) -> tuple[dict, list[dict]]:
    """(metrics, sample records) on the task's held-out set(s); see the module docstring."""
    names = getattr(task, "level_names", None)
    if not names:
        records = evaluate_items(params, model_cfg, task, task.eval_items(), rollout_cfg, batch_size)
        return _rates(records), records
    per_level = [evaluate_items(params, model_cfg, task, task.eval_items(level=i), rollout_cfg, batch_size)
                 for i in range(len(names))]
    metrics = _rates(per_level[-1])
    rates = [_rates(r) for r in per_level]
    metrics["solved_by_level"] = {name: r["eval_solved_frac"] for name, r in zip(names, rates, strict=True)}
    metrics["format_by_level"] = {name: r["eval_format_frac"] for name, r in zip(names, rates, strict=True)}
    return metrics, [r for records in per_level for r in records]


def _rates(records: list[dict]) -> dict:
    return {
        "eval_solved_frac": float(np.mean([r["solved"] for r in records])),
        "eval_format_frac": float(np.mean([r["format"] for r in records])),
        "eval_reward_mean": float(np.mean([r["reward"] for r in records])),
    }


def pass_at_k(params: dict, model_cfg: GemmaConfig, task: Task, items: list, k: int, rollout_cfg: RolloutConfig,
              key: jax.Array, batch_size: int = EVAL_BATCH) -> dict:
    """Sampled (rollout_cfg's temperature) k completions per held-out item: the mean solved rate (pass@1), the
    share of items solved at least once (pass@k), the format rate and the mean reward."""
    rows = [it for it in items for _ in range(k)]
    stop_table = task_stop_table(task, rollout_cfg)
    sampling = rollout_cfg.sampling
    scored = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        res = model.generate(params, model_cfg, [task.encode_prompt(it) for it in chunk], jax.random.fold_in(key, lo),
                             max_new_tokens=rollout_cfg.max_new_tokens, temperature=sampling.temperature,
                             top_k=sampling.top_k, top_p=sampling.top_p, eos_ids=task.eos_ids, stop_table=stop_table)
        scored += score_rows(task, chunk, np.asarray(res.tokens), np.asarray(res.lengths))
    solved = np.array([s.solved for s in scored]).reshape(len(items), k)
    return {"pass@1": float(solved.mean()), f"pass@{k}": float(solved.any(axis=1).mean()),
            "format": float(np.mean([s.format for s in scored])),
            "reward": float(np.mean([s.reward for s in scored])), "samples": [s.text for s in scored[:k]]}
