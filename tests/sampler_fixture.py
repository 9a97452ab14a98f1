"""A fixture of the sampler's tokens, written by the decode loop as it stood before the loop was restructured, so a
new loop can be checked to produce exactly the same tokens (tests/test_sampler.py reads it).

    python tests/sampler_fixture.py    # (re)write tests/fixtures/sampler_tokens.npz (only on purpose)

Cases (tiny random models of tests/test_sampler.py, float32, 24 new tokens): greedy and sampled, with rows that
stop early at "</answer>" (the stop string arrives as "</ans" + "wer>" or as one "</answer>" piece: the token
texts are made up so that tokens the model emits spell it) or at an EOS id, and rows that run to the budget.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

import model
from model.stop_text import stop_table

PATH = Path(__file__).parent / "fixtures" / "sampler_tokens.npz"
NEW = 24
LENGTHS = (9, 20, 3, 14, 1, 17)
# name -> (arch, temperature, top_k, top_p, num_repeats)
CASES = {
    "greedy_gemma3": ("gemma3", 0.0, None, None, 1),
    "sampled_gemma3": ("gemma3", 1.0, None, None, 2),
    "nucleus_gemma2": ("gemma2", 0.7, 5, 0.8, 1),
}


def pieces_for(vocab: int, opening: int, closing: int, whole: int) -> list[str]:
    """Token texts: "<id>" except three tokens that spell the stop string, alone or as a pair."""
    pieces = [f"<{i}>" for i in range(vocab)]
    pieces[opening], pieces[closing], pieces[whole] = " </ans", "wer>", "</answer>\n"
    return pieces


def run_case(name: str, stop_ids: np.ndarray, eos: int | None, think=None):
    """The sampler's result for one case; stop_ids = (opening, closing, whole) tokens of the stop string; eos None:
    no EOS id; think: budget forcing (model.think_budget.ThinkForcing) or None."""
    from test_sampler import _prompts, _tiny

    arch, temperature, top_k, top_p, repeats = CASES[name]
    cfg, params = _tiny(arch)
    table = stop_table(pieces_for(cfg.vocab_size, *map(int, stop_ids)), "</answer>")
    return model.generate(params, cfg, _prompts(LENGTHS, seed=3), jax.random.key(11), max_new_tokens=NEW,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=() if eos is None else (eos,),
                          stop_table=table, num_repeats=repeats, think=think)


def _choose_stops(name: str) -> tuple[np.ndarray, int]:
    """Stop tokens taken from a free run, so that some rows stop early on each rule and some do not."""
    free = run_case(name, np.array([5, 6, 7]), eos=None)  # ids 5-7: placeholders for the free run
    tokens = free.tokens
    opening, closing = int(tokens[0, 4]), int(tokens[0, 5])  # row 0: "</ans" then "wer>" at steps 4-5
    whole = int(tokens[2, 9])  # row 2 (or whoever emits it first) ends on the single piece
    eos = int(tokens[min(3, len(tokens) - 1), 14])
    return np.array([opening, closing, whole]), eos


def write() -> None:
    arrays = {}
    for name in CASES:
        stops, eos = _choose_stops(name)
        result = run_case(name, stops, eos)
        arrays |= {f"{name}/stop_ids": stops, f"{name}/eos": np.array(eos), f"{name}/tokens": result.tokens,
                   f"{name}/lengths": result.lengths, f"{name}/logprobs": result.logprobs,
                   f"{name}/truncated": result.truncated}
        print(name, "lengths", result.lengths.tolist())
    PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez(PATH, **arrays)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    write()
