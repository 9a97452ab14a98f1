"""From sampled completions to a training batch: padding layout, masks, and the "aha" phrase counts.

Layout of one training row (prompt left-padded into a bucket of Pb tokens, completion right-padded to M):

    [pad pad p0 p1 ... p_last | c0 c1 ... c_{n-1} pad pad]      length T = Pb + M
     attention_mask  0   0   1 ...   1   | 1 ...            1     0   0
     completion_mask 0   0   0 ...   0   | 1 ...            1     0   0

Pb is the longest prompt rounded up to a multiple of 64, so the step compiles once per bucket, not per batch
(Countdown prompts all fall in one or two buckets), while wasting at most 63 padding tokens per row; a
power-of-two bucket would pad a 150-token prompt to 256 and spend 40% of the step on padding.
"""

from __future__ import annotations

import re

import numpy as np

# Self-verification phrases users watch for (R1-Zero's "aha moment"); counted case-insensitively.
AHA_PHRASES = (
    "wait", "let me check", "let's check", "let me verify", "let's verify", "verify", "double-check",
    "try again", "let me try", "let's try", "recheck", "re-check", "mistake", "aha", "hmm",
)
_AHA_RE = {p: re.compile(r"\b" + re.escape(p) + r"\b", re.IGNORECASE) for p in AHA_PHRASES}


BUCKET = 64


def bucket_length(n: int, multiple: int = BUCKET) -> int:
    """n rounded up to a multiple of `multiple` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


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
    pb = bucket_length(max(len(p) for p in prompts))
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


def aha_counts(texts: list[str]) -> dict[str, float]:
    """Per-step aha signal: total phrase hits, the fraction of completions with any, and the top phrases."""
    hits = {p: sum(len(r.findall(t)) for t in texts) for p, r in _AHA_RE.items()}
    any_frac = float(np.mean([any(r.search(t) for r in _AHA_RE.values()) for t in texts])) if texts else 0.0
    out = {"aha_count": float(sum(hits.values())), "aha_frac": any_frac}
    out.update({f"aha/{p}": float(c) for p, c in hits.items() if c})
    return out
