"""Table-driven tests of the Countdown reward against TinyZero's rules.

Reference: TinyZero verl/utils/reward_score/countdown.py (compute_score, format_score=0.1, score=1.0),
worked by hand for each row below, plus CPython's own parser for what `eval` accepts. Scores are
compared exactly (tolerance 0): they are one of three constants.
"""

import numpy as np
import pytest

from data.countdown import MAX_DEPTH, ScoreBreakdown, breakdown, evaluate, extract_answer, score, score_batch
from data.prompts import render


def A(expr: str) -> str:
    """A completion whose last line holds one answer."""
    return f"<think>some work</think>\n<answer>{expr}</answer>"


NO, FMT, OK = 0.0, 0.1, 1.0

# (case id, completion, nums, target, expected score)
CASES = [
    # -- where the answer is read from (steps 1-2)
    ("correct", A("(1 + 2) / 3"), [1, 2, 3], 1, OK),
    ("no_tags", "<think>x</think>\nThe answer is 1 + 2 + 3", [1, 2, 3], 6, NO),
    ("not_on_last_line", "<answer>1 + 2 + 3</answer>\nI am done.", [1, 2, 3], 6, NO),
    ("trailing_newline_empties_last_line", A("1 + 2 + 3") + "\n", [1, 2, 3], 6, NO),
    ("single_line_completion", "<answer>1 + 2 + 3</answer>", [1, 2, 3], 6, OK),
    ("text_around_answer", "so: <answer>1 + 2 + 3</answer> is it", [1, 2, 3], 6, OK),
    ("unclosed", "<answer>1 + 2 + 3", [1, 2, 3], 6, NO),
    ("close_before_open", "</answer><answer>1 + 2 + 3</answer>", [1, 2, 3], 6, OK),
    ("last_of_two_counts_wrong", "<answer>1 + 2 + 3</answer> no: <answer>1 + 2 * 3</answer>", [1, 2, 3], 6, FMT),
    ("last_of_two_counts_right", "<answer>1 + 2 * 3</answer> no: <answer>1 + 2 + 3</answer>", [1, 2, 3], 6, OK),
    ("answer_on_earlier_line_ignored", "<answer>1 + 2 + 3</answer>\n<answer>1 * 2</answer>", [1, 2, 3], 6, FMT),
    ("nested_open_tag_is_in_the_answer", "<answer>1<answer>1 + 2 + 3</answer>", [1, 2, 3], 6, FMT),
    ("empty_answer", A(""), [1, 2, 3], 6, FMT),
    ("whitespace_only_answer", A("   "), [1, 2, 3], 6, FMT),
    ("whitespace_around_expression", A("   1 + 2 + 3   "), [1, 2, 3], 6, OK),
    ("tabs_and_form_feeds", A("1\t+\t2 +\f3"), [1, 2, 3], 6, OK),
    ("full_prompt_prefix", render("base", [1, 2, 3], 6) + " ok</think>\n<answer>1 + 2 + 3</answer>", [1, 2, 3], 6, OK),
    # -- numbers check (step 3)
    ("number_missing", A("1 + 2"), [1, 2, 3], 3, FMT),
    ("number_used_twice", A("1 + 2 + 3 + 3"), [1, 2, 3], 9, FMT),
    ("foreign_number", A("1 + 2 + 4"), [1, 2, 3], 7, FMT),
    ("repeated_nums_both_used", A("5 + 5 + 2"), [5, 5, 2], 12, OK),
    ("repeated_nums_one_used_twice_other", A("5 * 2 + 2"), [5, 5, 2], 12, FMT),
    ("any_order", A("3 + 2 + 1"), [1, 2, 3], 6, OK),
    ("decimal_is_two_numbers_value_1.5", A("1.5 * 2"), [1, 5, 2], 3, OK),
    ("decimal_is_not_fifteen", A("1.5 * 2"), [15, 2], 3, FMT),
    ("decimal_value_hits_target", A("2.5 * 4"), [2, 5, 4], 10, OK),
    ("leading_dot_decimal", A(".5 * 4"), [5, 4], 2, OK),
    ("unicode_digit_counts_but_does_not_parse", A("\u0661 + 2"), [1, 2], 3, FMT),
    # -- allowed characters and syntax (step 4)
    ("equals_sign", A("1 + 2 = 3"), [1, 2, 3], 3, FMT),
    ("letters", A("1 + 2 + 3 apples"), [1, 2, 3], 6, FMT),
    ("x_for_times", A("2 x 3"), [2, 3], 6, FMT),
    ("power_is_invalid", A("2**3 - 1"), [2, 3, 1], 7, FMT),
    ("floor_division_is_invalid", A("7 // 2 + 1"), [7, 2, 1], 4, FMT),
    ("star_space_star", A("2 * * 3"), [2, 3], 6, FMT),
    ("division_by_zero", A("5 / (3 - 3)"), [5, 3, 3], 5, FMT),
    ("zero_divided_is_fine", A("5 + (3 - 3) / 7"), [5, 3, 3, 7], 5, OK),
    ("unbalanced_open", A("(1 + 2 + 3"), [1, 2, 3], 6, FMT),
    ("unbalanced_close", A("1 + 2) + 3"), [1, 2, 3], 6, FMT),
    ("empty_parentheses", A("() + 1 + 2 + 3"), [1, 2, 3], 6, FMT),
    ("implicit_multiplication", A("2(3)"), [2, 3], 6, FMT),
    ("adjacent_numbers", A("2 3"), [2, 3], 5, FMT),
    ("trailing_operator", A("1 + 2 +"), [1, 2], 3, FMT),
    ("leading_binary_operator", A("* 1 + 2"), [1, 2], 3, FMT),
    ("leading_zero_integer", A("05 + 1"), [5, 1], 6, FMT),
    ("all_zero_integer_ok", A("00 + 6"), [0, 6], 6, OK),
    ("leading_zero_decimal_ok", A("05.5 * 2"), [5, 5, 2], 11, OK),
    ("double_dot", A("1..5 + 2"), [1, 5, 2], 3, FMT),
    ("spaced_dot", A("1 . 5 + 2"), [1, 5, 2], 3, FMT),
    ("carriage_return_inside_parentheses", A("(1 +\r 2)"), [1, 2], 3, OK),
    ("carriage_return_outside_parentheses", A("1 +\r 2"), [1, 2], 3, FMT),
    ("no_break_space", A("1 +\xa02"), [1, 2], 3, FMT),
    # -- evaluation (steps 4-5)
    ("precedence", A("1 + 2 * 3"), [1, 2, 3], 7, OK),
    ("left_associative_minus", A("10 - 3 - 2"), [10, 3, 2], 5, OK),
    ("left_associative_divide", A("12 / 3 / 2"), [12, 3, 2], 2, OK),
    ("nested_parentheses", A("((2 + (3 * (4 - 1))))"), [2, 3, 4, 1], 11, OK),
    ("unary_minus", A("-3 + 10"), [3, 10], 7, OK),
    ("double_unary_minus", A("- -3 + 4"), [3, 4], 7, OK),
    ("unary_minus_on_group", A("-(3 - 10)"), [3, 10], 7, OK),
    ("minus_unary_minus", A("2 - -5"), [2, 5], 7, OK),
    ("unary_binds_tighter_than_times", A("-2 * -3 + 1"), [2, 3, 1], 7, OK),
    ("unary_plus", A("+3 + 4"), [3, 4], 7, OK),
    ("negative_result", A("3 - 10"), [3, 10], 7, FMT),
    ("fractional_intermediate_hits", A("6 / (1 - 3 / 4)"), [6, 1, 3, 4], 24, OK),
    ("fractional_result_misses", A("10 / 3"), [10, 3], 3, FMT),
    ("float_rounding_within_tolerance", A("1 / 49 * 49"), [1, 49, 49], 1, OK),
    ("within_1e-5", A("10.000001"), [10, 1], 10, OK),  # digit runs 10 and 000001 (= 1); 1e-6 away
    ("float_edge_as_tinyzero", A("1.00001"), [1, 1], 1, FMT),  # eval: 1.0000000000065512e-05 away
    ("wrong_value", A("1 + 2 + 3"), [1, 2, 3], 7, FMT),
    ("depth_limit_ok", A("(" * MAX_DEPTH + "1 + 2" + ")" * MAX_DEPTH), [1, 2], 3, OK),
    ("depth_limit_exceeded", A("(" * (MAX_DEPTH + 1) + "1 + 2" + ")" * (MAX_DEPTH + 1)), [1, 2], 3, FMT),
]


@pytest.mark.parametrize("case, completion, nums, target, expected", CASES, ids=[c[0] for c in CASES])
def test_score_table(case, completion, nums, target, expected):
    assert score(completion, nums, target) == expected


def test_table_is_large_enough():
    """The brief asks for at least 40 hand-written cases."""
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "completion, nums, target, expected",
    [
        ("no answer here", [1, 2], 3, ScoreBreakdown(False, False, False, 0.0)),
        (A("1 + 1"), [1, 2], 3, ScoreBreakdown(True, False, False, 0.1)),
        (A("1 + 2 = 3"), [1, 2, 3], 3, ScoreBreakdown(True, True, False, 0.1)),
        (A("2 - 1"), [1, 2], 3, ScoreBreakdown(True, True, False, 0.1)),
        (A("2 + 1"), [1, 2], 3, ScoreBreakdown(True, True, True, 1.0)),
    ],
)
def test_breakdown_flags(completion, nums, target, expected):
    assert breakdown(completion, nums, target) == expected


def test_configured_scores():
    """format_score and correct_score replace 0.1 and 1.0; no answer stays 0."""
    kw = dict(format_score=0.25, correct_score=2.0)
    assert score(A("1 + 2"), [1, 2], 3, **kw) == 2.0
    assert score(A("1 - 2"), [1, 2], 3, **kw) == 0.25
    assert score("nothing", [1, 2], 3, **kw) == 0.0


def test_evaluate_matches_python_values_exactly():
    """Values are Python's own int/float results (what TinyZero's eval gives), compared with ==."""
    assert evaluate("7 / 2") == 3.5
    assert evaluate("1 + 2") == 3 and isinstance(evaluate("1 + 2"), int)
    assert evaluate("0.1 + 0.2") == 0.1 + 0.2  # 0.30000000000000004, not 3/10
    assert evaluate("-(2 * 3)") == -6
    assert evaluate("2 ** 3") is None and evaluate("1 / 0") is None


def test_extract_answer():
    assert extract_answer("a\n<answer> 1 + 2 </answer>") == "1 + 2"
    assert extract_answer("<answer>1</answer>\nno") is None
    assert extract_answer("<answer>a</answer>b</answer>") == "a"


def test_score_batch():
    out = score_batch([A("1 + 2"), A("1 - 2"), "x"], [[1, 2], [1, 2], [1, 2]], [3, 3, 3])
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, np.array([1.0, 0.1, 0.0], np.float32))
    assert score_batch([A("1 + 2")], [[1, 2]], [3], correct_score=5.0).tolist() == [5.0]
    with pytest.raises(ValueError, match="equal lengths"):
        score_batch([A("1 + 2")], [[1, 2], [1, 2]], [3])


def test_a_target_past_float_range_is_a_wrong_answer_not_an_error():
    # TinyZero's eval raises OverflowError on 1.0 - 10**400 and its caller scores the format; so do we
    assert score("<answer>1 / 1</answer>", [1, 1], 10**400) == 0.1
    assert score("<answer>1 + 1</answer>", [1, 1], 10**400) == 0.1
