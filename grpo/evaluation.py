"""Greedy evaluation on fixed held-out sets: the numbers a learning claim rests on.

Every eval decodes greedily (temperature 0) with the same token budget and stop rule as the rollouts. A task
with a difficulty ladder (`level_names`) is evaluated on EVERY level's held-out set, easiest first, into
`solved_by_level`; the headline `eval_solved_frac` / `eval_format_frac` / `eval_reward_mean` are the top
level's (TinyZero's difficulty and reward), so runs with and without a curriculum compare on the same footing.
"""

from __future__ import annotations

import jax
import numpy as np

from grpo.rollout import RolloutConfig, has_aha, sample_record, score_rows, task_stop_table
from grpo.tasks import Task
from model.config import GemmaConfig
from model.sampler import generate_in_chunks
from model.sampling import SamplingConfig
from model.think_budget import ThinkBudget, ThinkForcing, think_forcing

EVAL_BATCH = 64  # held-out prompts per greedy generate call
GREEDY = SamplingConfig(temperature=0.0)


def task_think_forcing(task: Task, budget: ThinkBudget | None, vocab_size: int) -> ThinkForcing | None:
    """s1 budget forcing over the task's tokenizer (model/think_budget.py); None when the budget is off."""
    if budget is None or not budget.active:
        return None
    tok = task.tokenizer
    return think_forcing(budget, tok.piece_texts(), lambda text: tok.encode(text, add_bos=False), vocab_size)


def evaluate_items(params: dict, model_cfg: GemmaConfig, task: Task, items: list, rollout_cfg: RolloutConfig,
                   batch_size: int = EVAL_BATCH, think: ThinkBudget | None = None) -> list[dict]:
    """Greedy completions of `items`, scored, as sample records (step 0; the caller sets it). With a thinking
    budget, each record also counts its `forced_tokens`."""
    if not items:
        return []
    records = []
    stop_table = task_stop_table(task, rollout_cfg)
    res = generate_in_chunks(params, model_cfg, [task.encode_prompt(it) for it in items], jax.random.key(0),
                             batch_size, max_new_tokens=rollout_cfg.max_new_tokens, sampling=GREEDY,
                             eos_ids=task.eos_ids, stop_table=stop_table,
                             think=task_think_forcing(task, think, model_cfg.vocab_size))
    scored = score_rows(task, items, res.tokens, res.lengths)
    for i, (it, s, n, t) in enumerate(zip(items, scored, res.lengths, res.truncated, strict=True)):
        records.append(sample_record(task, 0, i, it, s, n, t))
        if res.forced is not None:
            records[-1]["forced_tokens"] = int(res.forced[i].sum())
            # The forced wait text ("Wait") is itself a verification phrase: aha_split reads the model's own tokens.
            records[-1]["completion_unforced"] = own_text(task, res.tokens[i, : int(n)], res.forced[i, : int(n)])
    return records


def own_text(task: Task, tokens: np.ndarray, forced: np.ndarray) -> str:
    """The text of the tokens the model chose, each run between forced ones decoded apart and joined by a space
    (so a phrase cannot be made of words from both sides of a forced wait)."""
    cuts = np.flatnonzero(np.diff(forced.astype(np.int8))) + 1
    runs = [run for run, f in zip(np.split(tokens, cuts), np.split(forced, cuts), strict=True) if len(f) and not f[0]]
    return " ".join(task.decode(run) for run in runs)


def evaluate(params: dict, model_cfg: GemmaConfig, task: Task, rollout_cfg: RolloutConfig,
             batch_size: int = EVAL_BATCH, think: ThinkBudget | None = None) -> tuple[dict, list[dict]]:
    """(metrics, sample records) on the task's held-out set(s); see the module docstring. think: s1 budget
    forcing of the eval's completions (off by default)."""
    names = getattr(task, "level_names", None)
    if not names:
        records = evaluate_items(params, model_cfg, task, task.eval_items(), rollout_cfg, batch_size, think)
        return {**_rates(records), "aha_by_level": {HELD_OUT: aha_split(records)}}, records
    per_level = [evaluate_items(params, model_cfg, task, task.eval_items(level=i), rollout_cfg, batch_size, think)
                 for i in range(len(names))]
    metrics = _rates(per_level[-1])
    rates = [_rates(r) for r in per_level]
    metrics["solved_by_level"] = {name: r["eval_solved_frac"] for name, r in zip(names, rates, strict=True)}
    metrics["format_by_level"] = {name: r["eval_format_frac"] for name, r in zip(names, rates, strict=True)}
    metrics["aha_by_level"] = {name: aha_split(r) for name, r in zip(names, per_level, strict=True)}
    return metrics, [r for records in per_level for r in records]


HELD_OUT = "held_out"  # aha_by_level's key for a task without levels


def aha_split(records: list[dict]) -> dict[str, float | int | None]:
    """Self-verification on a held-out set (OAT-Zero's question: is a phrase there, and does it go with solving?):
    aha_frac, the share of completions with a verification phrase (grpo.rollout.has_aha) in the model's own
    tokens (budget forcing's wait text left out); solved_with_aha and solved_without_aha, the solved rate among
    those with and without one (None where there are none); num_with_aha of num_completions, so a rate over two
    completions reads as such. The step-0 eval is the base model's baseline; every later eval records the same."""
    flags = [has_aha(r.get("completion_unforced", r["completion"])) for r in records]
    with_aha = [r["solved"] for r, f in zip(records, flags, strict=True) if f]
    without = [r["solved"] for r, f in zip(records, flags, strict=True) if not f]
    rate = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"aha_frac": rate(flags), "solved_with_aha": rate(with_aha), "solved_without_aha": rate(without),
            "num_with_aha": len(with_aha), "num_completions": len(records)}


def _rates(records: list[dict]) -> dict:
    return {
        "eval_solved_frac": float(np.mean([r["solved"] for r in records])),
        "eval_format_frac": float(np.mean([r["format"] for r in records])),
        "eval_reward_mean": float(np.mean([r["reward"] for r in records])),
    }


def pass_at_k(params: dict, model_cfg: GemmaConfig, task: Task, items: list, k: int, rollout_cfg: RolloutConfig,
              key: jax.Array, batch_size: int = EVAL_BATCH, think: ThinkBudget | None = None) -> dict:
    """Sampled (rollout_cfg's temperature) k completions per held-out item: the mean solved rate (pass@1), the
    share of items solved at least once (pass@k), the format rate and the mean reward; with a thinking budget
    (s1 budget forcing), also the mean forced tokens per completion."""
    rows = [it for it in items for _ in range(k)]
    stop_table = task_stop_table(task, rollout_cfg)
    res = generate_in_chunks(params, model_cfg, [task.encode_prompt(it) for it in rows], key, batch_size,
                             max_new_tokens=rollout_cfg.max_new_tokens, sampling=rollout_cfg.sampling,
                             eos_ids=task.eos_ids, stop_table=stop_table,
                             think=task_think_forcing(task, think, model_cfg.vocab_size))
    scored = score_rows(task, rows, res.tokens, res.lengths)
    solved = np.array([s.solved for s in scored]).reshape(len(items), k)
    out = {"pass@1": float(solved.mean()), f"pass@{k}": float(solved.any(axis=1).mean()),
           "format": float(np.mean([s.format for s in scored])),
           "reward": float(np.mean([s.reward for s in scored])), "samples": [s.text for s in scored[:k]]}
    if res.forced is not None:
        out["forced_tokens"] = float(res.forced.sum(axis=1).mean())
    return out
