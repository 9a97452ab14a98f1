"""The Countdown reward: TinyZero's `compute_score`, without `eval`.

TinyZero (verl/utils/reward_score/countdown.py) scores a completion like this:
  1. keep only the last line (`text.split("\\n")[-1]`);
  2. take the last `<answer>(.*?)</answer>` match on it, stripped; none -> 0;
  3. the `\\d+` runs of the answer, as sorted ints, must equal the sorted numbers -> else format_score;
  4. the answer must match `^[\\d+\\-*/().\\s]+$` and evaluate -> else format_score;
  5. `abs(value - target) < 1e-5` -> correct_score, else format_score.

We keep every rule, including the odd ones ("1.5" is the numbers 1 and 5 in step 3 but the value 1.5 in
step 4; an empty answer scores format_score). Step 4 uses TinyZero's Python `eval`; we parse instead,
with a shunting-yard parser that accepts exactly the expressions CPython accepts over that alphabet
(leading zeros like "05" are a SyntaxError; "\\r" is whitespace only inside parentheses, as after
CPython's newline normalisation; other Unicode digits and spaces are SyntaxErrors) and computes with
Python's own int and float, in CPython's order. That makes every value bit-identical to `eval`'s,
which is why we use int/float rather than Fraction: exact rationals would disagree with TinyZero on
answers that sit within float rounding of the 1e-5 edge ("1.00001" for target 1 is 0.1 in TinyZero).

Work is bounded for any text: the answer is found with a few linear `str.find` scans (the lazy
regex is quadratic on many unclosed `<answer>` tags), and an answer longer than MAX_ANSWER_CHARS
fails the numbers check and the parse without being scanned (regex scans cost ~50 ns a character,
so this cap is what keeps a 1 MB answer at milliseconds). Within the cap, the numbers check stops
after len(nums) + 1 runs, and since it pins the literals to the given numbers, int arithmetic cannot
blow up.

Intended differences from TinyZero (everything else is identical):
  * `**` and `//` are invalid (format_score): eval would compute them, and `9**9**9` hangs it.
  * an answer over MAX_ANSWER_CHARS characters scores format_score: a bound on our work, not a copy of
    eval's limits (which differ between CPython versions). Only padding makes a real expression over
    four numbers that long.
  * nesting that exhausts eval's recursion (hundreds of unary signs, BUILD.md) still evaluates here:
    eval's limit depends on the Python version and the recursion limit, so copying it would make the
    score depend on them too.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence

import numpy as np

FORMAT_SCORE = 0.1
CORRECT_SCORE = 1.0
TOLERANCE = 1e-5  # TinyZero's `abs(result - target) < 1e-5`.
MAX_DEPTH = 200  # CPython's tokenizer MAXLEVEL: 201 nested parentheses is a SyntaxError there too.
# Below CPython's 4300-digit int() limit, so no literal can trip it; keeps the worst case at milliseconds.
MAX_ANSWER_CHARS = 4096

_OPEN, _CLOSE = "<answer>", "</answer>"
_NUMBER_RUN = re.compile(r"\d+")  # Unicode \d on purpose: TinyZero's check counts "١" as a 1.
_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")  # TinyZero's pattern, verbatim.
# One token after optional whitespace. ASCII digits only: CPython rejects other digits in literals.
# Python's tokenizer is greedy, so "**" and "//" come out as single (rejected) tokens.
_TOKEN = re.compile(r"([ \t\f\r]*)(?:(\d+\.\d*|\.\d+|\d+)|(\*\*|//|[-+*/()]))", re.ASCII)

_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_UNARY = {"u+": operator.pos, "u-": operator.neg}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "u+": 3, "u-": 3}  # unary binds tighter than * and /.


@dataclasses.dataclass(frozen=True)
class ScoreBreakdown:
    """How far a completion got through the rules, for training metrics."""

    has_answer: bool  # an <answer>...</answer> on the last line (step 2)
    numbers_valid: bool  # uses every given number exactly once (step 3)
    solved: bool  # evaluates to the target (step 5)
    score: float


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last `<answer>...</answer>` on the last line, or None (steps 1-2).

    Same result as TinyZero's `list(re.finditer(r"<answer>(.*?)</answer>", line))[-1]` in a few linear
    scans: each match ends at a `</answer>` and starts at the first `<answer>` after the previous
    `</answer>`, so the last match lives in the last closed segment that holds an `<answer>`.
    """
    line = completion[completion.rfind("\n") + 1 :]
    last_close = line.rfind(_CLOSE)
    last_open = line.rfind(_OPEN, 0, last_close) if last_close >= 0 else -1
    if last_open < 0:
        return None
    previous_close = line.rfind(_CLOSE, 0, last_open)
    segment_start = previous_close + len(_CLOSE) if previous_close >= 0 else 0
    end = line.find(_CLOSE, last_open + len(_OPEN))
    start = line.find(_OPEN, segment_start, end) + len(_OPEN)
    return line[start:end].strip()


def uses_numbers_once(answer: str, nums: Sequence[int]) -> bool:
    """TinyZero's numbers check (step 3): the sorted `\\d+` runs equal the sorted numbers."""
    wanted = sorted(int(n) for n in nums)
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    found = []
    for run in _NUMBER_RUN.finditer(answer):
        if len(found) == len(wanted):
            return False
        found.append(int(run.group()))
    return sorted(found) == wanted


def evaluate(answer: str) -> int | float | None:
    """The value CPython's eval would give the one-line answer, or None where TinyZero's eval fails (step 4).

    Also None for `**`, `//` and answers over MAX_ANSWER_CHARS; a value where only eval's recursion limit fails
    (see the module docstring). A newline inside parentheses, which eval accepts, is None: answers are one line.
    """
    if len(answer) > MAX_ANSWER_CHARS or not _ALLOWED.match(answer):
        return None
    tokens = _tokenize(answer)
    if tokens is None:
        return None
    try:
        return _shunting_yard(tokens)
    except (ZeroDivisionError, OverflowError):  # eval raises these too: 1/0, huge int / int.
        return None


def _tokenize(text: str) -> list[str | int | float] | None:
    """Numbers as int/float, operators and parentheses as str; None on anything CPython would reject."""
    tokens: list[str | int | float] = []
    pos, depth = 0, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            return None
        space, number, symbol = match.groups()
        if "\r" in space and depth == 0:  # a newline outside brackets ends the expression
            return None
        if number is not None:
            literal = _literal(number)
            if literal is None:
                return None
            tokens.append(literal)
        elif symbol in ("**", "//"):
            return None
        else:
            depth += {"(": 1, ")": -1}.get(symbol, 0)
            if depth > MAX_DEPTH or depth < 0:
                return None
            tokens.append(symbol)
        pos = match.end()
    return tokens


def _literal(text: str) -> int | float | None:
    if "." in text:
        return float(text)
    if text[0] == "0" and text.strip("0"):  # "05": leading zeros in decimal integer literals are not permitted
        return None
    return int(text)


def _shunting_yard(tokens: list[str | int | float]) -> int | float | None:
    """Evaluate Python's grammar for + - * / and unary +/- (expr > term > factor) without recursion."""
    values: list[int | float] = []
    ops: list[str] = []
    expect_operand = True
    for token in tokens:
        if expect_operand:
            if not isinstance(token, str):
                values.append(token)
                expect_operand = False
            elif token in ("+", "-"):
                ops.append("u" + token)
            elif token == "(":
                ops.append(token)
            else:  # "*", "/" or ")" where an operand belongs; ")" right after "(" is eval's empty tuple
                return None
        elif token == ")":
            while ops and ops[-1] != "(":
                _reduce(values, ops.pop())
            if not ops:
                return None
            ops.pop()
        elif isinstance(token, str) and token in _BINARY:
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[token]:  # left-associative
                _reduce(values, ops.pop())
            ops.append(token)
            expect_operand = True
        else:  # a number or "(" right after an operand: "1 2", "2(3)" (a call of an int in eval)
            return None
    if expect_operand or "(" in ops:
        return None
    while ops:
        _reduce(values, ops.pop())
    return values[0]


def _reduce(values: list[int | float], op: str) -> None:
    if op in _UNARY:
        values[-1] = _UNARY[op](values[-1])
    else:
        right = values.pop()
        values[-1] = _BINARY[op](values[-1], right)


def _within_tolerance(value, target) -> bool:
    try:
        return abs(value - target) < TOLERANCE
    except OverflowError:  # a (data file's) target past float range: TinyZero catches it as a wrong answer
        return False


def breakdown(
    completion: str,
    nums: Sequence[int],
    target: int | float,
    *,
    format_score: float = FORMAT_SCORE,
    correct_score: float = CORRECT_SCORE,
) -> ScoreBreakdown:
    """Score one completion and say which rules it passed."""
    answer = extract_answer(completion)
    if answer is None:
        return ScoreBreakdown(has_answer=False, numbers_valid=False, solved=False, score=0.0)
    if not uses_numbers_once(answer, nums):
        return ScoreBreakdown(has_answer=True, numbers_valid=False, solved=False, score=float(format_score))
    value = evaluate(answer)
    solved = value is not None and _within_tolerance(value, target)
    return ScoreBreakdown(
        has_answer=True,
        numbers_valid=True,
        solved=solved,
        score=float(correct_score if solved else format_score),
    )


def score(
    completion: str,
    nums: Sequence[int],
    target: int | float,
    *,
    format_score: float = FORMAT_SCORE,
    correct_score: float = CORRECT_SCORE,
) -> float:
    """TinyZero's Countdown reward: 0 (no answer), format_score (answered, wrong) or correct_score."""
    return breakdown(completion, nums, target, format_score=format_score, correct_score=correct_score).score


def score_batch(
    completions: Sequence[str],
    nums_list: Sequence[Sequence[int]],
    targets: Sequence[int | float],
    **kw: float,
) -> np.ndarray:
    """`score` over a batch, as a float32 array of shape [B]."""
    if not len(completions) == len(nums_list) == len(targets):
        raise ValueError(
            f"score_batch needs equal lengths; got {len(completions)} completions, "
            f"{len(nums_list)} nums, {len(targets)} targets"
        )
    return np.array(
        [score(c, n, t, **kw) for c, n, t in zip(completions, nums_list, targets, strict=True)], dtype=np.float32
    )
