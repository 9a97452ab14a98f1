"""Group-relative advantages: each completion's reward compared with the other completions of its prompt.

    A_i = (r_i - mean(r over i's group)) / (std + STD_EPS)

`scale_rewards` picks the std: "group" (the group's own, original GRPO), "batch" (one std over the whole
batch, more robust when a group's rewards are nearly all equal) or "none" (no division, Dr. GRPO: the
std division up-weights prompts that are too easy or too hard). The std is the unbiased one (ddof=1),
as TRL's `torch.std`, so G must be >= 2. Host-side numpy: rewards come from Python scoring anyway.
"""

from __future__ import annotations

import numpy as np

# Added to the std so a group whose rewards are all equal gets advantage 0, not 0/0.
STD_EPS = 1e-6


def group_index(group_ids_or_num_generations, num_rows: int) -> np.ndarray:
    """[B] int group index 0..P-1: from explicit ids (any hashable labels) or consecutive runs of G rows."""
    if np.ndim(group_ids_or_num_generations) == 0:
        g = int(group_ids_or_num_generations)
        if g < 1 or num_rows % g:
            raise ValueError(f"{num_rows} rewards do not split into groups of num_generations={g}")
        return np.arange(num_rows) // g
    ids = np.asarray(group_ids_or_num_generations)
    if ids.shape != (num_rows,):
        raise ValueError(f"group_ids must have shape ({num_rows},) like rewards, got {ids.shape}")
    return np.unique(ids, return_inverse=True)[1].reshape(-1)


def compute_advantages(rewards, group_ids_or_num_generations, scale_rewards: str = "group") -> np.ndarray:
    """[B] float32 advantages for [B] rewards. The second argument is [B] group ids or the int G."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {r.shape}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    idx = group_index(group_ids_or_num_generations, r.shape[0])
    counts = np.bincount(idx)
    if scale_rewards == "group" and counts.min() < 2:
        raise ValueError(f"scale_rewards='group' needs >= 2 completions per group; smallest group has {counts.min()}")
    mean = (np.bincount(idx, weights=r) / counts)[idx]
    centred = r - mean
    if scale_rewards == "none":
        return centred.astype(np.float32)
    if scale_rewards == "batch":
        std = r.std(ddof=1) if r.size > 1 else 0.0
    else:
        std = np.sqrt(np.bincount(idx, weights=centred**2) / (counts - 1))[idx]
    return (centred / (std + STD_EPS)).astype(np.float32)
