"""Property tests of the Countdown reward: agreement with TinyZero's rules, no exceptions, bounded time.

Reference: a re-statement of TinyZero's compute_score in which `eval` is replaced by CPython's own
parser (`ast.parse`) plus a walk that applies Python's +, -, *, / to the parsed numbers, so values are
exactly eval's. It treats `**` and `//` as invalid, our one intended difference. Scores must be equal
(tolerance 0). Hypothesis runs derandomized with a fixed example budget so the file stays fast.
"""

import ast
import operator
import re
import time
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.countdown import MAX_ANSWER_CHARS, evaluate, extract_answer, score

SETTINGS = settings(
    derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
TIME_LIMIT_S = 0.5  # generous: these inputs take a few milliseconds; the bound only catches quadratic blowups

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _walk(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_walk(node.left), _walk(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    raise TypeError(f"not arithmetic: {ast.dump(node)}")  # tuples, calls, ** and // (intended difference)


def reference_value(answer: str):
    """What TinyZero's evaluate_equation returns (None on failure), via CPython's parser, no eval."""
    if not re.match(r"^[\d+\-*/().\s]+$", answer):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "'int' object is not callable" SyntaxWarnings for "2(3)"
            return _walk(ast.parse(answer, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def reference_score(completion: str, nums, target) -> float:
    """TinyZero compute_score with format_score=0.1, score=1.0, on the completion."""
    matches = list(re.finditer(r"<answer>(.*?)</answer>", completion.split("\n")[-1]))
    if not matches:
        return 0.0
    answer = matches[-1].group(1).strip()
    if sorted(int(n) for n in re.findall(r"\d+", answer)) != sorted(nums):
        return 0.1
    value = reference_value(answer)
    return 1.0 if value is not None and abs(value - target) < 1e-5 else 0.1


ALPHABET = "0123456789+-*/(). \t\r"
expression_text = st.text(alphabet=ALPHABET, max_size=24)


_LITERAL = st.one_of(
    st.integers(0, 120).map(str),
    st.integers(0, 120).map(str),
    st.from_regex(r"\A[0-9]{1,2}\.[0-9]{0,2}\Z"),  # [0-9]: a regex \d would draw any Unicode digit
    st.from_regex(r"\A\.[0-9]{1,2}\Z"),
    st.sampled_from(["07", "00"]),  # leading zeros: a SyntaxError for CPython unless all zeros
)
_SPACE = st.sampled_from(["", "", " ", " ", "  ", "\t", "\r"])  # "\r" is legal only inside parentheses
_OPERATOR = st.sampled_from(["+", "-", "*", "/", "**", "//"])


def _structured():
    """Mostly well-formed nested expressions, so the 1.0 and value paths get exercised too."""

    def extend(inner):
        binary = st.tuples(inner, _SPACE, _OPERATOR, _SPACE, inner)
        return st.one_of(
            binary.map("".join),
            st.tuples(st.sampled_from(["-", "+", "- "]), inner).map("".join),
            inner.map(lambda e: f"({e})"),
        )

    return st.recursive(_LITERAL, extend, max_leaves=6)


@st.composite
def _chain(draw):
    """Flat chains like "8 - 3 - 2 / 4": associativity and precedence decide the value."""
    parts = [draw(_LITERAL)]
    for _ in range(draw(st.integers(1, 4))):
        parts += [draw(_SPACE), draw(_OPERATOR), draw(_SPACE), draw(st.sampled_from(["", "-"])), draw(_LITERAL)]
    text = "".join(parts)
    return f"({text})" if draw(st.booleans()) else text


answers = st.one_of(expression_text, _structured(), _chain())


@SETTINGS
@given(answer=answers)
def test_evaluate_matches_cpython(answer):
    """Same value, same type (int vs float), or both invalid."""
    ours, ref = evaluate(answer.strip()), reference_value(answer.strip())
    assert (ours is None) == (ref is None), (answer, ours, ref)
    if ours is not None:
        assert type(ours) is type(ref) and (ours == ref or (ours != ours and ref != ref)), (answer, ours, ref)


@SETTINGS
@given(
    answer=answers,
    before=st.sampled_from(["", "x\n", "<think>hm</think>\n", "<answer>1</answer> ", "</answer>"]),
    after=st.sampled_from(["", " done", "\n", "</answer>", " <answer>2</answer>"]),
    use_answer_numbers=st.booleans(),
    nums=st.lists(st.integers(0, 20), max_size=4),
    target_offset=st.sampled_from([0, 0, 1, 1e-6, 1e-4]),
)
def test_score_matches_reference(answer, before, after, use_answer_numbers, nums, target_offset):
    completion = f"{before}<answer>{answer}</answer>{after}"
    if use_answer_numbers:  # make the numbers check pass, and aim the target at the value when there is one
        nums = [int(n) for n in re.findall(r"\d+", answer.strip())]
    value = reference_value(answer.strip())
    target = (value if isinstance(value, int | float) and abs(value) < 1e6 else 7) + target_offset
    assert score(completion, nums, target) == reference_score(completion, nums, target)


TAG_PIECES = ["<answer>", "</answer>", "<", ">", "/", "answer", "1", " ", "\n", "x"]


@SETTINGS
@given(pieces=st.lists(st.sampled_from(TAG_PIECES), max_size=16))
def test_extract_answer_matches_lazy_regex(pieces):
    """Our linear scan picks the same answer as TinyZero's re.finditer(r"<answer>(.*?)</answer>")[-1]."""
    text = "".join(pieces)
    matches = list(re.finditer(r"<answer>(.*?)</answer>", text.split("\n")[-1]))
    assert extract_answer(text) == (matches[-1].group(1).strip() if matches else None)


@SETTINGS
@given(text=st.text(max_size=200), nums=st.lists(st.integers(0, 10**6), max_size=5), target=st.integers(-100, 1000))
def test_never_raises_and_returns_a_known_score(text, nums, target):
    assert score(text, nums, target) in (0.0, 0.1, 1.0)
    assert score(f"<answer>{text}</answer>", nums, target) in (0.0, 0.1, 1.0)
    assert score(text, nums, target, format_score=0.3, correct_score=3.0) in (0.0, 0.3, 3.0)


MB = 1_000_000
ADVERSARIAL = {
    "unclosed_tags": "<answer>" * (MB // 8),
    "many_empty_answers": "<answer></answer>" * (MB // 17),
    "closes_then_opens": "</answer>" * (MB // 18) + "<answer>" * (MB // 16),
    "newlines": "\n" * MB,
    "deep_parentheses": "<answer>" + "(" * (MB // 2) + "1" + ")" * (MB // 2) + "</answer>",
    "spaces_in_answer": "<answer>1 +" + " " * MB + "2</answer>",
    "unary_chain": "<answer>" + "-" * MB + "1</answer>",
    "long_sum": "<answer>" + "1+" * (MB // 2) + "1</answer>",
    "digits": "<answer>" + "9" * MB + "</answer>",
    "power_tower": "<answer>" + "9**" * (MB // 3) + "9</answer>",
    "letters": "<answer>" + "x" * MB + "</answer>",
}


def test_adversarial_megabyte_inputs_are_fast():
    """Each ~1 MB completion scores within TIME_LIMIT_S (they take milliseconds) and gives 0 or 0.1."""
    for name, completion in ADVERSARIAL.items():
        start = time.perf_counter()
        result = score(completion, [1, 2], 3)
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_LIMIT_S, (name, elapsed)
        assert result in (0.0, 0.1), (name, result)


def test_long_answers_are_capped():
    """An answer over MAX_ANSWER_CHARS scores format_score even when CPython would evaluate it."""
    at_cap = "1 +" + " " * (MAX_ANSWER_CHARS - 4) + "2"
    assert len(at_cap) == MAX_ANSWER_CHARS and score(f"<answer>{at_cap}</answer>", [1, 2], 3) == 1.0
    assert score(f"<answer>{at_cap[:3]} {at_cap[3:]}</answer>", [1, 2], 3) == 0.1  # one character over
