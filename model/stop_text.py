"""Stopping a row once its decoded text contains a string (e.g. `</answer>`), decided inside the decode loop.

Token boundaries do not line up with text: "</answer>" may arrive as one piece, as "</" + "answer" + ">", or
inside a longer piece such as "</answer>\n". So the sampler runs a string-matching automaton (Knuth-Morris-
Pratt) over the characters, one whole token at a time: state s in [0, S) means the text so far ends with the
first s characters of the stop string (S = its length), and

    table[s, token] = the state after appending the token's text, or S once the stop string has appeared.

The table is [S, V] int8 (2.4 MB for Gemma 3's 262k vocabulary and "</answer>"), built once per vocabulary on
the host and passed to the jitted sampler as an array, so a different stop string does not recompile. A row's
state lives in the decode state; reaching S ends the row exactly like an EOS token (the token that completes
the match is kept). `no_stop_table` is the [1, V] table that never matches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def _next_state(text: str, stop: str) -> int:
    """KMP state after `text`: len(stop) if stop occurs in it, else the longest prefix of stop that ends it."""
    if stop in text:
        return len(stop)
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def stop_table(pieces: Sequence[str], stop: str) -> np.ndarray:
    """[len(stop), len(pieces)] int8 transition table for `stop` over tokens whose decoded texts are `pieces`."""
    n = len(stop)
    if not 0 < n < 127:
        raise ValueError(f"stop string must have 1..126 characters, got {stop!r}")
    table = np.zeros((n, len(pieces)), np.int8)  # a piece sharing no character with stop resets the match
    chars = set(stop)
    for token, piece in enumerate(pieces):
        if not piece:  # control tokens decode to nothing: the match neither grows nor breaks
            table[:, token] = np.arange(n)
        elif chars.intersection(piece):
            table[:, token] = [_next_state(stop[:s] + piece, stop) for s in range(n)]
    return table


def match_start_table(pieces: Sequence[str], stop: str) -> np.ndarray:
    """[len(stop), len(pieces)] int8: on a transition that completes `stop` (stop_table reaches len(stop)), how many
    of the match's characters came before the token (0: it begins inside the token); 0 elsewhere. The match
    may end inside the token ("</think>\n"), so the state alone does not say where it began."""
    n = len(stop)
    back = np.zeros((n, len(pieces)), np.int8)
    chars = set(stop)
    for token, piece in enumerate(pieces):
        if piece and chars.intersection(piece):
            for s in range(n):
                at = (stop[:s] + piece).find(stop)
                if at >= 0:
                    back[s, token] = max(0, s - at)
    return back


def no_stop_table(vocab_size: int) -> np.ndarray:
    """The [1, V] table of "no stop string": every token leads to state 0, never to the match state 1."""
    return np.zeros((1, vocab_size), np.int8)


@functools.lru_cache(maxsize=4)
def cached_stop_table(pieces: tuple[str, ...], stop: str) -> np.ndarray:
    """stop_table, built once per (vocabulary, stop string) in a process (~seconds for a 262k vocabulary)."""
    return stop_table(pieces, stop)


@functools.lru_cache(maxsize=4)
def cached_match_start_table(pieces: tuple[str, ...], stop: str) -> np.ndarray:
    """match_start_table, built once per (vocabulary, stop string) in a process."""
    return match_start_table(pieces, stop)
