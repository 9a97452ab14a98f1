"""Random GRPO-shaped rows for the step and log-prob tests: left-padded prompts, right-padded completions."""

from __future__ import annotations

import numpy as np


def ragged_rows(rng: np.random.Generator, vocab: int, rows: int, length: int, prompt: int,
                right_pad_mod: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, attention_mask int32, completion_mask float32), each [rows, length]: row i has i % 3 padding
    slots on the left and i % right_pad_mod on the right; the completion is every attended column from `prompt`."""
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    attention = np.ones((rows, length), np.int32)
    for i in range(rows):
        attention[i, : i % 3] = 0
        attention[i, length - i % right_pad_mod:] = 0
    completion = ((np.arange(length)[None, :] >= prompt) * attention).astype(np.float32)
    return tokens, attention, completion
