"""s1 budget forcing inside the decode loop (model/think_budget.py) on tiny random models.

The model is "biased to emit </think> early" through its vocabulary: many token ids spell pieces of the delimiter
("</think>", "</", "think", ">", "</thi", "nk>\\n", "x</"), so sampled rows complete it within a few tokens (shown
with forcing off). References: the same sampler with forcing off (same key: the same samples up to the first
rewind) and the fixture of the sampler before budget forcing existed (tests/fixtures/sampler_tokens.npz).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import model
from model.think_budget import ThinkBudget, think_forcing

END = "</think>"
WAIT_PIECES = (" Wa", "it")  # wait_text " Wait" is two tokens: ids 3, 4
EARLY = ("</think>", "</", "think", ">", "</thi", "nk>\n", "x</", "a", " b")  # delimiter-heavy vocabulary
RARE = ("</", "thi", "nk>", "a", " b", "c", "d", "e")  # the delimiter needs three tokens in a row: rare
MIN, MAX, NEW = 8, 6, 20


def _pieces(cycle: tuple[str, ...], vocab: int) -> list[str]:
    pieces = [""] * 3 + list(WAIT_PIECES) + [cycle[i % len(cycle)] for i in range(vocab - 5)]
    return pieces


def _forcing(budget: ThinkBudget, pieces: list[str]):
    ids = {" Wait": [3, 4], END: [5 + pieces[5:].index(END)] if END in pieces[5:] else [5, 6, 7]}
    return think_forcing(budget, pieces, ids.__getitem__, len(pieces))


@pytest.fixture(scope="module")
def tiny():
    from test_sampler import _prompts, _tiny

    cfg, params = _tiny("gemma3")
    return cfg, params, _prompts((9, 20, 3, 14, 1, 17, 5, 11), seed=5)


def _run(tiny, pieces, budget, prompts=None, seed=7):
    cfg, params, default_prompts = tiny
    return model.generate(params, cfg, prompts or default_prompts, jax.random.key(seed), max_new_tokens=NEW,
                          temperature=1.0, eos_ids=(), think=_forcing(budget, pieces) if budget else None)


def _text(pieces, tokens, n) -> tuple[str, np.ndarray]:
    """A row's text and the text length through each of its n columns."""
    lens = np.cumsum([len(pieces[t]) for t in tokens[:n]])
    return "".join(pieces[t] for t in tokens[:n]), lens


def _match_column(pieces, tokens, n) -> int | None:
    """The column of the token holding the first character of the row's first END, or None."""
    text, lens = _text(pieces, tokens, n)
    at = text.find(END)
    return None if at < 0 else int(np.searchsorted(lens, at, side="right"))


def _assert_logprobs_match_a_full_forward(tiny, result, prompts, rows):
    """Reference: a no-cache forward over prompt + the row's output as it stands (forced tokens included): every
    unforced token's log-prob (temperature 1: raw log-softmax) within 3e-5. Keys of rewound tokens left visible in
    the cache, or positions off by the rewind, would change them."""
    from test_sampler import BUFFER, _padded_logits

    cfg, params, _ = tiny
    for r in rows:
        n = int(result.lengths[r])
        seq = list(prompts[r]) + result.tokens[r, :n].tolist()
        buf = np.zeros(BUFFER, np.int32)
        buf[:len(seq)] = seq
        logits = np.asarray(_padded_logits(params, buf, len(seq), cfg), np.float64)[len(prompts[r]) - 1:len(seq) - 1]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        want = np.take_along_axis(logp, result.tokens[r, :n, None], axis=1)[:, 0]
        free = ~result.forced[r, :n]
        # 2.5e-6 measured on the CI CPU (float32 cache path vs a float64 log-softmax of the no-cache logits)
        np.testing.assert_allclose(result.logprobs[r, :n][free], want[free], atol=3e-5, err_msg=f"row {r}")


def test_min_budget_rewinds_to_where_the_delimiter_began_and_forces_wait(tiny):
    """Forcing off: most rows end thinking before MIN tokens. Forcing on (min MIN, one wait): those rows hold the
    off run's tokens up to where its delimiter began, then exactly " Wait" (forced, log-prob 0) at that column;
    rows whose delimiter came at or after MIN are untouched; the first delimiter kept begins at or after MIN or
    after the row's one wait."""
    pieces = _pieces(EARLY, tiny[0].vocab_size)
    off = _run(tiny, pieces, None)
    on = _run(tiny, pieces, ThinkBudget(min_think_tokens=MIN, max_waits=1))
    early = [r for r in range(len(off.tokens)) if (c := _match_column(pieces, off.tokens[r], NEW)) is not None
             and c < MIN]
    assert len(early) >= len(off.tokens) // 2, "the tiny vocabulary should end thinking early"
    for r in range(len(off.tokens)):
        c = _match_column(pieces, off.tokens[r], NEW)
        if r not in early:
            np.testing.assert_array_equal(on.tokens[r], off.tokens[r], err_msg=f"row {r} needed no forcing")
            assert not on.forced[r].any()
            continue
        np.testing.assert_array_equal(on.tokens[r, :c], off.tokens[r, :c], err_msg=f"row {r} before the rewind")
        np.testing.assert_array_equal(on.tokens[r, c:c + 2], [3, 4], err_msg=f"row {r}: the wait text at {c}")
        assert on.forced[r].tolist() == [c <= i < c + 2 for i in range(NEW)]
        assert (on.logprobs[r, c:c + 2] == 0).all() and (on.logprobs[r, :c] != 0).all()
    _assert_logprobs_match_a_full_forward(tiny, on, tiny[2], early)


def test_waits_are_bounded_and_rows_independent(tiny):
    """With two waits, no row carries more than two forced waits, every forced run is the wait text, the text
    never shows an END that began before MIN unless both waits were spent; row 0 is the same token for token
    whatever the other rows of its batch are (their rewinds come at other steps)."""
    pieces = _pieces(EARLY, tiny[0].vocab_size)
    budget = ThinkBudget(min_think_tokens=MIN, max_waits=2)
    on = _run(tiny, pieces, budget)
    _assert_logprobs_match_a_full_forward(tiny, on, tiny[2], range(len(on.tokens)))
    for r in range(len(on.tokens)):
        forced = np.flatnonzero(on.forced[r])
        assert len(forced) in (0, 2, 4) and (on.tokens[r, forced] == np.tile([3, 4], len(forced) // 2)).all()
        c = _match_column(pieces, on.tokens[r], int(on.lengths[r]))
        assert c is None or c >= MIN or len(forced) == 4, f"row {r}: END at column {c}, {len(forced)} forced"
    prompts = tiny[2]
    other = _run(tiny, pieces, budget, prompts=[prompts[0], *prompts[:0:-1]])
    np.testing.assert_array_equal(other.tokens[0], on.tokens[0])
    np.testing.assert_array_equal(other.forced[0], on.forced[0])


def test_max_budget_forces_the_delimiter_without_fragments(tiny):
    """Max MAX: a row still thinking at MAX tokens gets END forced (tokens "</", "thi", "nk>") where its text does
    not end in a partial END (a partial match is rewound first); the tokens before are the off run's; the row
    then goes on sampling, unforced."""
    pieces = _pieces(RARE, tiny[0].vocab_size)
    off = _run(tiny, pieces, None)
    on = _run(tiny, pieces, ThinkBudget(max_think_tokens=MAX))
    end_ids = _forcing(ThinkBudget(max_think_tokens=MAX), pieces).rule.sequences[1]
    forced_rows = 0
    for r in range(len(on.tokens)):
        c = _match_column(pieces, off.tokens[r], NEW)
        if c is not None and c + 3 <= MAX:  # ended thinking by itself within the budget
            np.testing.assert_array_equal(on.tokens[r], off.tokens[r])
            continue
        forced = np.flatnonzero(on.forced[r])
        assert len(forced) == 3, f"row {r}: {on.tokens[r]}"
        start = int(forced[0])
        forced_rows += 1
        assert start <= MAX and forced.tolist() == [start, start + 1, start + 2]
        np.testing.assert_array_equal(on.tokens[r, forced], end_ids)
        np.testing.assert_array_equal(on.tokens[r, :start], off.tokens[r, :start])
        before, _ = _text(pieces, on.tokens[r], start)
        assert not any(before.endswith(END[:k]) for k in range(1, len(END))), f"row {r}: {before!r}"
        assert on.lengths[r] > start + 3  # it went on to sample its answer
    assert forced_rows >= 2
    _assert_logprobs_match_a_full_forward(tiny, on, tiny[2], range(len(on.tokens)))


def test_a_maximum_at_the_completion_budget_still_fits_the_whole_delimiter(tiny):
    """Max NEW - 2 with a 3-token END: forced at column NEW - 2 it would be cut to "</thi" by the budget, so it
    is not forced there (the rows are out of room either way); max NEW - 3 still fits all 3 tokens."""
    pieces = _pieces(RARE, tiny[0].vocab_size)
    off = _run(tiny, pieces, None)
    tight = _run(tiny, pieces, ThinkBudget(max_think_tokens=NEW - 2))
    assert not tight.forced.any()
    np.testing.assert_array_equal(tight.tokens, off.tokens)
    fits = _run(tiny, pieces, ThinkBudget(max_think_tokens=NEW - 3))
    for r in np.flatnonzero(fits.forced.any(axis=1)):
        assert np.flatnonzero(fits.forced[r]).tolist() == [NEW - 3, NEW - 2, NEW - 1]
    assert fits.forced.any(axis=1).sum() >= 2


def test_forcing_that_never_triggers_equals_the_fixture():
    """Reference: tests/fixtures/sampler_tokens.npz (the sampler before budget forcing). A maximum at the token
    budget never fires, yet the tokens go through the forcing path (per-row columns, positions written per step,
    more cache slots): identical tokens, lengths and truncation; log-probs within 1e-5."""
    from sampler_fixture import NEW as FIXTURE_NEW
    from sampler_fixture import PATH, pieces_for, run_case

    golden = np.load(PATH)
    for case in ("greedy_gemma3", "sampled_gemma3"):
        stops = golden[f"{case}/stop_ids"]
        pieces = pieces_for(256, *map(int, stops))
        think = think_forcing(ThinkBudget(max_think_tokens=FIXTURE_NEW), pieces, lambda s: [5], 256)
        result = run_case(case, stops, int(golden[f"{case}/eos"]), think=think)
        np.testing.assert_array_equal(result.tokens, golden[f"{case}/tokens"], err_msg=case)
        np.testing.assert_array_equal(result.lengths, golden[f"{case}/lengths"])
        np.testing.assert_array_equal(result.truncated, golden[f"{case}/truncated"])
        np.testing.assert_allclose(result.logprobs, golden[f"{case}/logprobs"], atol=1e-5)
        assert not result.forced.any()


@pytest.mark.parametrize("kwargs, message", [
    ({"min_think_tokens": 9, "max_think_tokens": 8}, "min_think_tokens 9 must be <= max_think_tokens 8"),
    ({"wait_text": ""}, "wait_text must not be empty"),
    ({"min_think_tokens": -1}, "min_think_tokens must be a non-negative integer"),
])
def test_bad_budgets_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThinkBudget(**kwargs)


def test_budget_above_the_completion_budget_is_refused_and_off_means_no_forcing():
    with pytest.raises(ValueError, match="max_think_tokens 65 must be <= max_new_tokens 64"):
        ThinkBudget(max_think_tokens=65).check_fits(64)
    assert think_forcing(ThinkBudget(), ["a"], lambda s: [0], 1) is None
