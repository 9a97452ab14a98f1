"""From sampled completions to a training batch: padding layout, masks, and the "aha" phrase counts.

Layout of one training row (prompt left-padded into a bucket of Pb tokens, completion right-padded to M):

    [pad pad p0 p1 ... p_last | c0 c1 ... c_{n-1} pad pad]      length T = Pb + M
     attention_mask  0   0   1 ...   1   | 1 ...            1     0   0
     completion_mask 0   0   0 ...   0   | 1 ...            1     0   0   (all 0 if masked as truncated)

Pb is the power-of-two bucket of the longest prompt, so the step compiles once per bucket, not per batch.
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


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def build_batch(
    prompts: list[list[int]],
    completions: np.ndarray,
    lengths: np.ndarray,
    truncated: np.ndarray,
    advantages: np.ndarray,
    *,
    pad_id: int = 0,
    mask_truncated: bool = False,
) -> dict[str, np.ndarray]:
    """Training arrays for `grpo` step: tokens, attention_mask, completion_mask [B, T]; advantages [B]."""
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
        if not (mask_truncated and truncated[i]):
            completion[i, pb : pb + n] = 1
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion,
            "advantages": np.asarray(advantages, np.float32)}


def aha_counts(texts: list[str]) -> dict[str, float]:
    """Per-step aha signal: total phrase hits, the fraction of completions with any, and the top phrases."""
    hits = {p: sum(len(r.findall(t)) for t in texts) for p, r in _AHA_RE.items()}
    any_frac = float(np.mean([any(r.search(t) for r in _AHA_RE.values()) for t in texts])) if texts else 0.0
    out = {"aha_count": float(sum(hits.values())), "aha_frac": any_frac}
    out.update({f"aha/{p}": float(c) for p, c in hits.items() if c})
    return out
