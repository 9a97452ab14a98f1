"""s1 budget forcing (Muennighoff et al. 2025, arXiv 2501.19393) inside the decode loop: a minimum and a maximum
number of thinking tokens, decided per row on the device, with no host round trip.

A row thinks until its text holds the end-of-thinking delimiter (`end_text`, "</think>"), which may arrive over
several tokens; an automaton over whole tokens (model/stop_text.py) follows the match.

- Minimum: when a SAMPLED token completes the delimiter and fewer than `min_think_tokens` tokens precede the
  match, the row is rewound to the token where the match began (its output column, and its cache: the slots of
  the dropped tokens become invalid) and `wait_text` (" Wait") is forced from there, at most `max_waits` times per
  row, so no fragment of the delimiter stays in the text. Rewinds work in whole tokens: text of the first dropped
  token before the delimiter goes with it.
- Maximum: once a thinking row holds `max_think_tokens` tokens, the delimiter is forced (after rewinding a partial
  match; after the rest of a wait text being forced, so by at most its length - 1 tokens later) and the row goes
  on to its answer unforced.

Forced tokens are marked in `ThinkState.forced` (SampleResult.forced) and get log-prob 0: leave them out of any
loss. Layout: a row no longer writes column `step`; it writes its own column `cols`. The cache slots still
advance with the shared step (slot P + t holds the token emitted at step t, at position prompt length + its
column), so the k/v writes stay one dynamic_update_slice for every row; a rewind only flips `valid` bits.
Rewound tokens cost steps, so the loop gets `extra_steps` beyond max_new_tokens (cache slots included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.stop_text import cached_match_start_table, cached_stop_table

WAIT, END = 0, 1  # rows of ForcingRule.sequences
NOT_FORCING = -1  # ThinkState.queue of a row emitting sampled tokens


@dataclasses.dataclass(frozen=True)
class ThinkBudget:
    """Thinking budget of an eval or a sampling run (flags of the same names); both budgets 0: no forcing."""

    min_think_tokens: int = 0  # a delimiter before this many thinking tokens is replaced by wait_text; 0: none
    max_think_tokens: int = 0  # the delimiter is forced once thinking reaches this many tokens; 0: none
    wait_text: str = " Wait"  # s1's continuation
    end_text: str = "</think>"  # the end-of-thinking delimiter of TinyZero's prompt (data/prompts.py)
    max_waits: int = 2  # early delimiters replaced per row; the next one is kept

    def __post_init__(self):
        for name in ("min_think_tokens", "max_think_tokens", "max_waits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_think_tokens and self.min_think_tokens > self.max_think_tokens:
            raise ValueError(f"min_think_tokens {self.min_think_tokens} must be <= max_think_tokens "
                             f"{self.max_think_tokens}")
        if not self.wait_text:
            raise ValueError("wait_text must not be empty")
        if not 0 < len(self.end_text) < 127:
            raise ValueError(f"end_text must have 1..126 characters, got {self.end_text!r}")

    @property
    def active(self) -> bool:
        return bool(self.min_think_tokens or self.max_think_tokens)

    def check_fits(self, max_new_tokens: int) -> ThinkBudget:
        """This budget, if both budgets are within the completion budget; else a ValueError naming the budget."""
        for name in ("min_think_tokens", "max_think_tokens"):
            if getattr(self, name) > max_new_tokens:
                raise ValueError(f"{name} {getattr(self, name)} must be <= max_new_tokens {max_new_tokens}")
        return self

    @property
    def extra_steps(self) -> int:
        """Decode steps beyond max_new_tokens that rewinds may use: each drops at most one token per delimiter
        character, and there are at most max_waits + 1 of them (the last one before forcing the delimiter). Tokens
        that add no text (control ids) inside a dropped match can exceed it: such a row ends truncated, short of
        max_new_tokens."""
        return (self.max_waits + 1) * len(self.end_text) if self.active else 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForcingRule:
    """A ThinkBudget as traced arrays: other budgets or texts of the same lengths do not recompile."""

    end_table: jax.Array  # [E, V] int8 automaton of end_text (model/stop_text.py)
    match_start: jax.Array  # [E, V] int8: on a transition completing end_text, its characters before this token
    piece_len: jax.Array  # [V] int32 characters each token adds to the text
    sequences: jax.Array  # [2, F] int32 forced ids: row WAIT (wait_text), row END (end_text), 0-padded
    seq_len: jax.Array  # [2] int32
    min_think: jax.Array  # [] int32 (0: no minimum)
    max_think: jax.Array  # [] int32 (0: no maximum)
    max_waits: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class ThinkForcing:
    """What `generate` takes: the rule (host arrays) and the static step allowance."""

    rule: ForcingRule
    extra_steps: int


def think_forcing(budget: ThinkBudget, pieces: Sequence[str], encode: Callable[[str], list[int]],
                  vocab_size: int) -> ThinkForcing | None:
    """The forcing for `budget` over a tokenizer (its piece texts and encoder, no BOS); None when inactive."""
    if not budget.active:
        return None
    pieces = tuple(pieces) + ("",) * (vocab_size - len(pieces))  # ids past the tokenizer's pieces add no text
    ids = [list(encode(budget.wait_text)), list(encode(budget.end_text))]
    if not all(ids):  # end_text is a fixed delimiter, wait_text the flag
        raise ValueError(f"--wait_text {budget.wait_text!r} / end_text {budget.end_text!r}: encode to no tokens")
    width = max(map(len, ids))
    rule = ForcingRule(
        end_table=cached_stop_table(pieces, budget.end_text),
        match_start=cached_match_start_table(pieces, budget.end_text),
        piece_len=np.array([len(p) for p in pieces], np.int32),
        sequences=np.array([row + [0] * (width - len(row)) for row in ids], np.int32),
        seq_len=np.array(list(map(len, ids)), np.int32),
        min_think=np.int32(budget.min_think_tokens),
        max_think=np.int32(budget.max_think_tokens),
        max_waits=np.int32(budget.max_waits),
    )
    return ThinkForcing(rule, budget.extra_steps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ThinkState:
    """Per-row forcing state in the decode carry (DecodeState.think)."""

    cols: jax.Array  # [B] int32 tokens in the row's output (the next column it writes)
    start: jax.Array  # [B] int32 position of the row's first generated token (its prompt length)
    end_state: jax.Array  # [B] int32 end_text automaton state
    answering: jax.Array  # [B] bool: thinking has ended (delimiter kept or forced)
    waits: jax.Array  # [B] int32 delimiters replaced so far
    queue: jax.Array  # [B] int32 forced sequence being emitted (WAIT, END) or NOT_FORCING
    queued: jax.Array  # [B] int32 its tokens emitted so far
    chars: jax.Array  # [B, M] int32 text length through each column
    end_hist: jax.Array  # [B, M] int32 end_text automaton state after each column
    text_hist: jax.Array  # [B, M] int32 stop-string automaton state after each column
    forced: jax.Array  # [B, M] bool: the column's token was forced


def initial_state(start: jax.Array, max_new_tokens: int) -> ThinkState:
    """Before generated token 0; start [B] = each row's prompt length."""
    b, m = start.shape[0], max_new_tokens
    zeros = jnp.zeros((b,), jnp.int32)
    return ThinkState(cols=zeros, start=start.astype(jnp.int32), end_state=zeros, answering=jnp.zeros((b,), bool),
                      waits=zeros, queue=jnp.full((b,), NOT_FORCING, jnp.int32), queued=zeros,
                      chars=jnp.zeros((b, m), jnp.int32), end_hist=jnp.zeros((b, m), jnp.int32),
                      text_hist=jnp.zeros((b, m), jnp.int32), forced=jnp.zeros((b, m), bool))


def _before(buf: jax.Array, col: jax.Array) -> jax.Array:
    """buf [B, M] at column col - 1 per row, 0 where col = 0."""
    prev = jnp.take_along_axis(buf, jnp.maximum(col - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(col > 0, prev, 0)


def _put(buf: jax.Array, col: jax.Array, value: jax.Array, write: jax.Array) -> jax.Array:
    """buf [B, M] with value [B] at column col [B] of the rows where write [B]."""
    hit = (jnp.arange(buf.shape[1])[None, :] == col[:, None]) & write[:, None]
    return jnp.where(hit, value[:, None], buf)


def forced_record(state, token: jax.Array, logprob: jax.Array, stops, rule: ForcingRule, pad_id: int, steps: int):
    """`model.sampler._record` with budget forcing: the step's sampled token [B] is kept, replaced by a forced
    one, or triggers a rewind (module docstring). `state` is the sampler's DecodeState; returns the next one."""
    th, cache = state.think, state.cache
    b, m = state.tokens.shape
    ends = rule.end_table.shape[0]  # automaton state `ends` = delimiter matched
    live = ~state.done & (th.cols < m) & (state.step < steps)  # [B]
    queuing = th.queue != NOT_FORCING
    queued_token = rule.sequences[jnp.maximum(th.queue, 0), jnp.minimum(th.queued, rule.sequences.shape[1] - 1)]
    token = jnp.where(queuing, queued_token, token)

    # Which rows rewind: an early delimiter (sampled), or the maximum reached while thinking.
    thinking = ~th.answering & ~queuing
    # Only where the whole delimiter still fits in the row's output: a maximum within its length of
    # max_new_tokens would leave "</thi" at the end (a row out of room has no answer either way).
    force_end = (thinking & (rule.max_think > 0) & (th.cols >= rule.max_think)
                 & (th.cols + rule.seq_len[END] <= m))
    completes = rule.end_table[th.end_state, token] >= ends
    back = jnp.where(force_end, th.end_state, rule.match_start[th.end_state, token].astype(jnp.int32))
    start_char = _before(th.chars, th.cols) - back  # where the (partial) match begins in the text
    before = (jnp.arange(m)[None, :] < th.cols[:, None]) & (th.chars <= start_char[:, None])
    match_col = before.sum(axis=1).astype(jnp.int32)  # the column of the token holding the match's first char
    early = thinking & ~force_end & completes & (match_col < rule.min_think) & (th.waits < rule.max_waits)
    rewind = (early | force_end) & live
    col = jnp.where(rewind, match_col, th.cols)
    queue = jnp.where(early, WAIT, END)
    token = jnp.where(early | force_end, rule.sequences[queue, 0], token)
    forced = queuing | early | force_end
    queued = jnp.where(queuing, th.queued, 0) + 1
    queue = jnp.where(queuing, th.queue, queue)
    queue = jnp.where(forced & (queued < rule.seq_len[jnp.maximum(queue, 0)]), queue, NOT_FORCING)

    # The automata continue from the state after column col - 1 (their state before a rewind's first token).
    end_base = jnp.where(rewind, _before(th.end_hist, col), th.end_state)
    text_base = jnp.where(rewind, _before(th.text_hist, col), state.text_state)
    end_state = rule.end_table[end_base, token].astype(jnp.int32)
    text_state = stops.text_table[text_base, token].astype(jnp.int32)
    answering = th.answering | (end_state >= ends)
    end_state = jnp.where(end_state >= ends, 0, end_state)  # past the delimiter it no longer matters
    hit_eos = jnp.any(token[:, None] == stops.eos_ids[None, :], axis=-1)
    hit_text = text_state >= stops.text_table.shape[0]

    token = jnp.where(live, token, pad_id)
    logprob = jnp.where(live & ~forced, logprob, 0.0)
    tail = (jnp.arange(m)[None, :] > col[:, None]) & rewind[:, None]  # columns the rewind dropped
    chars = _before(th.chars, col) + rule.piece_len[token]
    slots = cache.positions.shape[1]
    prompt_slots = slots - steps
    slot = prompt_slots + jnp.minimum(state.step, steps - 1)  # where this step's token is fed next step
    dropped = (rewind[:, None] & (jnp.arange(slots)[None, :] >= prompt_slots)
               & (cache.positions >= (th.start + col)[:, None]))
    positions = jax.lax.dynamic_update_slice(cache.positions, (th.start + col)[:, None], (0, slot))
    cache = dataclasses.replace(cache, positions=positions, valid=cache.valid & ~dropped)
    cols = jnp.where(live, col + 1, th.cols)
    think = ThinkState(
        cols=cols, start=th.start,
        end_state=jnp.where(live, end_state, th.end_state),
        answering=jnp.where(live, answering, th.answering),
        waits=th.waits + (early & live).astype(jnp.int32),
        queue=jnp.where(live, queue, th.queue),
        queued=jnp.where(live, queued, th.queued),
        chars=_put(th.chars, col, chars, live),
        end_hist=_put(th.end_hist, col, end_state, live),
        text_hist=_put(th.text_hist, col, text_state, live),
        forced=_put(jnp.where(tail, False, th.forced), col, forced, live),
    )
    return dataclasses.replace(
        state,
        step=state.step + 1,
        last_token=token,
        tokens=_put(jnp.where(tail, pad_id, state.tokens), col, token, live),
        logprobs=_put(jnp.where(tail, 0.0, state.logprobs), col, logprob, live),
        done=state.done | (live & (hit_eos | hit_text)),
        lengths=cols,
        text_state=jnp.where(live, text_state, state.text_state),
        cache=cache,
        think=think,
    )
