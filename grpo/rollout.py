"""Rollouts: how completions are drawn (RolloutConfig), sampling and scoring a step's groups, and the training
batch they become (padding layout, masks, advantages), plus the "aha" phrase counts.

Layout of one training row (prompt left-padded into a bucket of Pb tokens, completion right-padded to M):

    [pad pad p0 p1 ... p_last | c0 c1 ... c_{n-1} pad pad]      length T = Pb + M
     attention_mask  0   0   1 ...   1   | 1 ...            1     0   0
     completion_mask 0   0   0 ...   0   | 1 ...            1     0   0

Pb is the longest prompt rounded up to the sampler's prompt bucket (model.sampler.prompt_bucket: quarter-octave
steps), so the step compiles once per bucket, not per batch, and wastes at most a quarter of the prompt
columns on padding.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np

from grpo.advantages import compute_advantages
from grpo.config import GRPOConfig
from grpo.tasks import Scored, Task
from model.sampler import generate_in_chunks, prompt_bucket
from model.sampling import SamplingConfig
from model.shared_prompt import prompt_sharing

# Self-verification phrases users watch for (R1-Zero's "aha moment"); counted case-insensitively.
AHA_PHRASES = (
    "wait", "let me check", "let's check", "let me verify", "let's verify", "verify", "double-check",
    "try again", "let me try", "let's try", "recheck", "re-check", "mistake", "aha", "hmm",
)
_AHA_RE = {p: re.compile(r"\b" + re.escape(p) + r"\b", re.IGNORECASE) for p in AHA_PHRASES}




@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the training loop draws completions: the token budget and the sampling strategy (eval is greedy).

    The GRPO objective must score tokens under the distribution they were drawn from and must know the budget,
    so GRPOConfig's temperature, max_completion_length and logprob_tail are derived from this config by
    `align_grpo_config`, never set separately.
    """

    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    # End a row once its text holds the task's stop string ("</answer>"), inside the decode loop. Not TinyZero's
    # behaviour (it samples to EOS or the budget): see BUILD.md. Tasks without a stop_table() ignore it.
    stop_at_answer: bool = True
    # DAPO's dynamic sampling, as a filter: a group whose G rewards are all equal has zero advantages; with this
    # on its rows also leave the loss's token count (and the KL term and entropy bonus, as in DAPO, whose filter drops
    # them from the batch), so they do not dilute the other groups.
    skip_zero_std_groups: bool = True
    # DAPO's dynamic sampling, as a refill (grpo/dynamic_sampling.py): sample further rounds of prompts until the
    # step holds prompts_per_step groups whose rewards differ, at most max_oversample x prompts_per_step prompts
    # in all. It composes with skip_zero_std_groups: groups still without signal at the cap fill the batch, and
    # the filter decides whether they enter the loss.
    dynamic_sampling: bool = False
    max_oversample: float = 3.0
    # Rows per sampler call (0: the whole batch in one call), rounded down to whole groups (at least one). A
    # machine's plan sizes it so one call fits a device (grpo/planner.py); the calls draw from
    # keys folded from the step's key.
    batch_rows: int = 0

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.batch_rows < 0:
            raise ValueError(f"rollout_batch_size must be >= 0, got {self.batch_rows}")
        if not 1 <= self.max_oversample < math.inf:
            raise ValueError(f"max_oversample must be a finite number >= 1, got {self.max_oversample}")


def align_grpo_config(grpo_cfg: GRPOConfig, rollout_cfg: RolloutConfig) -> GRPOConfig:
    """grpo_cfg with its rollout-derived fields set from rollout_cfg (the one place they are decided):

    - temperature: the sampler's, so log-prob ratios compare like with like (greedy rollouts score at 1.0);
    - logprob_tail = max_completion_length = max_new_tokens: every completion token sits in the tail
      (build_batch puts completions after a left-padded prompt) and dr_grpo divides by the budget.
    """
    temperature = rollout_cfg.sampling.temperature or 1.0
    n = rollout_cfg.max_new_tokens
    return dataclasses.replace(grpo_cfg, temperature=temperature, logprob_tail=n, max_completion_length=n)


def build_batch(
    prompts: list[list[int]],
    completions: np.ndarray,
    lengths: np.ndarray,
    truncated: np.ndarray,
    advantages: np.ndarray,
    *,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Training arrays for the grpo step: tokens, attention_mask, completion_mask [B, T]; advantages, truncated [B].

    Truncated rows keep their completion mask; the step drops them when mask_truncated_completions is set.
    """
    b, m = completions.shape
    pb = prompt_bucket(max(len(p) for p in prompts))  # the sampler's buckets: one rule, few compiles
    tokens = np.full((b, pb + m), pad_id, np.int32)
    attention = np.zeros((b, pb + m), np.int32)
    completion = np.zeros((b, pb + m), np.int32)
    for i, p in enumerate(prompts):
        n = int(lengths[i])
        tokens[i, pb - len(p) : pb] = p
        tokens[i, pb : pb + n] = completions[i, :n]
        attention[i, pb - len(p) : pb + n] = 1
        completion[i, pb : pb + n] = 1
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion,
            "advantages": np.asarray(advantages, np.float32), "truncated": np.asarray(truncated, np.float32)}


def check_shared_prompts(batch: dict, group: int, tail: int | None) -> None:
    """Raise unless every group of `group` consecutive rows has the same tokens and mask before the last `tail`
    columns: what GRPOConfig.shared_prompt assumes (the step reads only a group's first row there)."""
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
    sharing = prompt_sharing(*tokens.shape, group, tail)
    if sharing is None:  # the step will not share prompts: nothing to check
        return
    cut = sharing.prompt_len
    for name, a in (("tokens", tokens), ("attention_mask", mask)):
        g = a[:, :cut].reshape(-1, group, cut)
        bad = np.flatnonzero((g != g[:, :1]).any(axis=(1, 2)))
        if bad.size:
            raise ValueError(f"shared_prompt: rows of group {int(bad[0])} differ in {name} before the last {tail} "
                             f"columns; each group of {group} rows must share its prompt (or set shared_prompt=False)")


def has_aha(text: str) -> bool:
    """Does the text contain any self-verification phrase?"""
    return any(r.search(text) for r in _AHA_RE.values())


def aha_counts(texts: list[str], solved: list[bool] | None = None) -> dict[str, float | None]:
    """Per-step aha signal: total phrase hits, the fraction of completions with any, the top phrases, and (given
    `solved`) that fraction among solved and among unsolved completions (None where there are none): a phrase
    count alone proves nothing, since base models say "wait" too; verification that pays off shows as
    aha_frac_solved > aha_frac_unsolved."""
    hits = {p: sum(len(r.findall(t)) for t in texts) for p, r in _AHA_RE.items()}
    flags = [has_aha(t) for t in texts]
    out: dict[str, float | None] = {"aha_count": float(sum(hits.values())),
                                    "aha_frac": float(np.mean(flags)) if texts else 0.0}
    if solved is not None:
        for name, want in (("aha_frac_solved", True), ("aha_frac_unsolved", False)):
            picked = [f for f, s in zip(flags, solved, strict=True) if bool(s) == want]
            out[name] = float(np.mean(picked)) if picked else None
    out.update({f"aha/{p}": float(c) for p, c in hits.items() if c})
    return out


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One step's sampled groups: the training batch (numpy) and what the logs need. Row r answers prompt r // G."""

    batch: dict[str, np.ndarray]
    metrics: dict
    scored: list[Scored]  # [B]
    items: list  # [B] the task item (puzzle) of each row
    lengths: np.ndarray  # [B] generated tokens per row, the stop token included
    # Every row sampled for the step, the batch's and those dynamic sampling left out (None: the batch's rows are
    # all of them), and the prompts the step took from the data stream (0: as many as the batch has groups).
    sampled: SampledRows | None = None
    prompts_used: int = 0


@dataclasses.dataclass(frozen=True)
class SampledRows:
    """Sampled and scored completions before they become a batch: rows prompt-major, G consecutive rows per group.
    Dynamic sampling concatenates several of these and keeps some of their groups (`take_groups`)."""

    prompts: list[list[int]]  # [B] prompt token ids
    items: list  # [B] task items
    tokens: np.ndarray  # [B, M] generated ids
    lengths: np.ndarray  # [B] generated tokens, the stop token included
    truncated: np.ndarray  # [B] bool: hit the budget
    scored: list[Scored]  # [B]
    sample_s: float

    @property
    def rewards(self) -> np.ndarray:
        return np.array([s.reward for s in self.scored], np.float32)


def sample_rows(params, model_cfg, task: Task, items: list, num_generations: int, rollout_cfg: RolloutConfig,
                key) -> SampledRows:
    """G completions per prompt, sampled (whole groups per sampler call: rollout_cfg.batch_rows) and scored."""
    expanded = [it for it in items for _ in range(num_generations)]
    unique = [task.encode_prompt(it) for it in items]  # one prefill per prompt, its cache rows replicated G times
    sampling = rollout_cfg.sampling
    t0 = time.perf_counter()
    stop_table = task_stop_table(task, rollout_cfg)
    chunk = max(1, rollout_cfg.batch_rows // num_generations) if rollout_cfg.batch_rows else len(unique)
    res = generate_in_chunks(params, model_cfg, unique, key, chunk, max_new_tokens=rollout_cfg.max_new_tokens,
                             sampling=sampling, eos_ids=task.eos_ids, stop_table=stop_table,
                             num_repeats=num_generations)
    tokens, lengths, truncated = res.tokens, res.lengths, res.truncated
    sample_s = time.perf_counter() - t0
    prompts = [p for p in unique for _ in range(num_generations)]
    return SampledRows(prompts, expanded, tokens, lengths, truncated, score_rows(task, expanded, tokens, lengths),
                       sample_s)


def concat_rows(parts: list[SampledRows]) -> SampledRows:
    """Several sampler rounds as one set of rows (in order)."""
    if len(parts) == 1:
        return parts[0]
    return SampledRows([p for r in parts for p in r.prompts], [it for r in parts for it in r.items],
                       *(np.concatenate([getattr(r, n) for r in parts]) for n in ("tokens", "lengths", "truncated")),
                       [s for r in parts for s in r.scored], sum(r.sample_s for r in parts))


def take_groups(rows: SampledRows, groups: np.ndarray, num_generations: int) -> SampledRows:
    """The rows of the given groups (indices into rows' groups), in that order."""
    idx = (np.asarray(groups)[:, None] * num_generations + np.arange(num_generations)).reshape(-1)
    pick = lambda seq: [seq[i] for i in idx]
    return SampledRows(pick(rows.prompts), pick(rows.items), rows.tokens[idx], rows.lengths[idx],
                       rows.truncated[idx], pick(rows.scored), rows.sample_s)


def make_rollout(rows: SampledRows, num_generations: int, rollout_cfg: RolloutConfig, scale_rewards: str,
                 pad_id: int, metrics: dict | None = None) -> Rollout:
    """The training batch of `rows` (advantages per group; zero-signal groups masked out when
    skip_zero_std_groups) with `metrics` (default: rollout_metrics of the same rows)."""
    rewards = rows.rewards
    advantages = np.asarray(compute_advantages(rewards, num_generations, scale_rewards), np.float32)
    batch = build_batch(rows.prompts, rows.tokens, rows.lengths, rows.truncated, advantages, pad_id=pad_id)
    if rollout_cfg.skip_zero_std_groups:
        batch["completion_mask"][np.repeat(zero_std_groups(rewards, num_generations), num_generations)] = 0
    if metrics is None:
        metrics = rollout_metrics(rows, num_generations)
    return Rollout(batch, metrics, rows.scored, rows.items, rows.lengths)


def rollout_metrics(rows: SampledRows, num_generations: int, task: Task | None = None) -> dict:
    """What a step's sampled rows show, all of them (before any dynamic-sampling choice): rewards, solved and
    format rates, groups without signal (equal rewards; equal solved outcomes), lengths, speed, aha phrases,
    and, when the task names answer shapes (`answer_template(item, text)`), the most common ones."""
    rewards, lengths = rows.rewards, rows.lengths
    solved = np.array([s.solved for s in rows.scored])
    metrics = {
        "frac_zero_std_groups": float(zero_std_groups(rewards, num_generations).mean()),
        "frac_zero_std_solved": float(zero_std_groups(solved, num_generations).mean()),
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "solved_frac": float(solved.mean()),
        "format_frac": float(np.mean([s.format for s in rows.scored])),
        "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
        "truncated_frac": float(rows.truncated.mean()), "sample_s": rows.sample_s,
        "sample_tokens_per_s": float(lengths.sum() / max(rows.sample_s, 1e-9)),
        **aha_counts([s.text for s in rows.scored], solved.tolist()),
    }
    shapes = getattr(task, "answer_templates", None)
    if shapes is not None:
        metrics["answer_templates"] = shapes(rows.items, [s.text for s in rows.scored])
    return metrics


def sample_groups(params, model_cfg, task: Task, items: list, num_generations: int, rollout_cfg: RolloutConfig,
                  key, scale_rewards: str) -> Rollout:
    """G completions per prompt, sampled and scored, as a training batch plus the step's rollout metrics."""
    rows = sample_rows(params, model_cfg, task, items, num_generations, rollout_cfg, key)
    return make_rollout(rows, num_generations, rollout_cfg, scale_rewards, model_cfg.pad_id,
                        rollout_metrics(rows, num_generations, task))


def task_stop_table(task: Task, rollout_cfg: RolloutConfig) -> np.ndarray | None:
    """The task's stop-string automaton when rollouts stop at the answer, else None (EOS only)."""
    table = getattr(task, "stop_table", None)
    return table() if rollout_cfg.stop_at_answer and table is not None else None


def zero_std_groups(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """[P] bool: groups whose G values (rewards, or solved flags) are all equal (rewards: every advantage is 0)."""
    groups = np.asarray(rewards).reshape(-1, num_generations)
    return np.all(groups == groups[:, :1], axis=1)


def sample_record(task: Task, step: int, group: int, item, scored: Scored, length, truncated) -> dict:
    """One completion as data: the puzzle's fields (the task's `describe`, else the item's repr), the text and
    its scores. bin/report reads these lines."""
    describe = getattr(task, "describe", None)
    fields = describe(item) if describe else {"item": repr(item)}
    return {"step": step, "group": group, **fields, "completion": scored.text, "reward": scored.reward,
            "solved": bool(scored.solved), "format": bool(scored.format), "length": int(length),
            "truncated": bool(truncated)}


def score_rows(task: Task, items: list, tokens: np.ndarray, lengths: np.ndarray) -> list[Scored]:
    """The task's score of each row's generated tokens (up to its length)."""
    return [task.score(it, tokens[i, : int(lengths[i])]) for i, it in enumerate(items)]
