"""Tests of the puzzle generator and solvers.

References: the reward (data.countdown.score) must give every stored solution exactly 1.0; the plain
Python search (solve) is the reference for the batched numpy search; Stream-of-Search's rule (every
intermediate value a non-negative integer) is checked by walking each solution's syntax tree.
"""

import ast
import collections
import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from data import puzzles
from data.countdown import score
from data.curriculum import balanced_heldout, balanced_train
from data.puzzles import Puzzle, PuzzleConfig, generate, make_splits, solve

SAMPLE = 3000  # "a sample of a few thousand"


@pytest.fixture(scope="module")
def sample() -> list[Puzzle]:
    return generate(SAMPLE, seed=123)


def test_every_stored_solution_scores_one(sample):
    bad = [p for p in sample if score(f"<answer>{p.solution}</answer>", p.nums, p.target) != 1.0]
    assert not bad, bad[:5]


def _intermediates(node: ast.AST) -> list[Fraction]:
    """Exact value of every sub-expression of a solution (our own strings, parsed with ast, never eval)."""
    if isinstance(node, ast.Constant):
        return [Fraction(node.value)]
    left, right = _intermediates(node.left), _intermediates(node.right)
    a, b = left[-1], right[-1]
    value = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b if b else None}[type(node.op)]
    assert value is not None, "division by zero"
    return left + right + [value]


def test_solutions_follow_stream_of_search_rules(sample):
    """Every intermediate value is a non-negative integer, and the numbers are used exactly once."""
    for p in sample[:500]:
        values = _intermediates(ast.parse(p.solution, mode="eval").body)
        assert all(v >= 0 and v.denominator == 1 for v in values), p
        assert values[-1] == p.target, p
        leaves = sorted(int(n.value) for n in ast.walk(ast.parse(p.solution)) if isinstance(n, ast.Constant))
        assert leaves == sorted(p.nums), p


def test_default_counts_and_ranges(sample):
    cfg = PuzzleConfig()
    assert all(len(p.nums) in cfg.counts for p in sample)
    assert all(cfg.num_min <= n <= cfg.num_max for p in sample for n in p.nums)
    assert all(cfg.target_min <= p.target <= cfg.target_max for p in sample)
    assert all(isinstance(n, int) for p in sample for n in p.nums) and all(isinstance(p.target, int) for p in sample)
    counts = collections.Counter(len(p.nums) for p in sample)
    assert 0.4 < counts[3] / SAMPLE < 0.6  # counts drawn uniformly; binomial sd ~0.009


def test_targets_are_uniform(sample):
    """Targets are drawn first and uniformly (as Stream-of-Search does): every target shows up.

    Each of the 91 targets is expected ~33 times in 3000; 10 is > 4 standard deviations below.
    """
    per_target = collections.Counter(p.target for p in sample)
    assert len(per_target) == 91 and min(per_target.values()) >= 10


def test_custom_config_is_respected():
    cfg = PuzzleConfig(counts=(2,), num_min=3, num_max=12, target_min=5, target_max=20)  # all reachable
    ps = generate(300, seed=1, cfg=cfg)
    assert all(len(p.nums) == 2 and all(3 <= n <= 12 for n in p.nums) and 5 <= p.target <= 20 for p in ps)
    assert all(score(f"<answer>{p.solution}</answer>", p.nums, p.target) == 1.0 for p in ps)


def test_deterministic_and_prefix_stable(monkeypatch):
    """Same seed, same puzzles; a shorter request is a prefix of a longer one, across blocks."""
    monkeypatch.setattr(puzzles, "BLOCK", 16)  # so the test crosses several numpy blocks cheaply
    a = generate(40, seed=5)
    assert a == generate(40, seed=5)
    assert generate(23, seed=5) == a[:23]
    assert generate(40, seed=6) != a
    assert generate(0, seed=5) == []


def test_make_splits_disjoint_and_sized():
    train, test = make_splits(400, 100, seed=9)
    assert len(train) == 400 and len(test) == 100
    test_keys = {p.key for p in test}
    assert len(test_keys) == 100  # test puzzles are distinct
    assert not test_keys & {p.key for p in train}
    assert make_splits(400, 100, seed=9) == (train, test)


def test_make_splits_too_small_a_space_is_an_error():
    cfg = PuzzleConfig(counts=(2,), num_min=1, num_max=2, target_min=1, target_max=4)
    with pytest.raises(ValueError, match="too small"):
        make_splits(10, 50, seed=0, cfg=cfg)


def test_unreachable_targets_are_an_error():
    cfg = PuzzleConfig(counts=(2,), num_min=1, num_max=1, target_min=50, target_max=50, max_draws=50)
    with pytest.raises(ValueError, match="widen the ranges"):
        generate(1, seed=0, cfg=cfg)


@pytest.mark.parametrize(
    "kwargs",
    [dict(counts=(5,)), dict(counts=()), dict(num_min=0), dict(num_min=5, num_max=4), dict(target_min=0),
     dict(target_min=9, target_max=8), dict(num_max=10**6), dict(max_draws=0), dict(balance_ops=True),
     dict(counts=(2, 3), balance_ops=True)],
)  # fmt: skip
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError, match="PuzzleConfig"):
        PuzzleConfig(**kwargs)


def _solving_ops(nums: tuple[int, ...], target: int) -> set[str]:
    """The operations that make target from the two numbers in some order (exact, as the reward checks)."""
    (x, y), t = (Fraction(n) for n in nums), target
    return {op for op, values in (("+", [x + y]), ("-", [x - y, y - x]), ("*", [x * y]), ("/", [x / y, y / x]))
            if t in values}


@pytest.mark.parametrize("num_max, target_max", [(9, 18), (30, 60)])
def test_balanced_ops_each_operation_solves_a_quarter(num_max, target_max):
    """balance_ops: every puzzle is solved by exactly one operation, its stored solution's, and each operation
    solves a quarter of the puzzles. Tolerance 0.04: four binomial standard deviations at n = 2000 (0.0097)."""
    cfg = PuzzleConfig(counts=(2,), num_max=num_max, target_min=1, target_max=target_max, balance_ops=True)
    ps = generate(2000, seed=3, cfg=cfg)
    assert all(score(f"<answer>{p.solution}</answer>", p.nums, p.target) == 1.0 for p in ps)
    ops = [_solving_ops(p.nums, p.target) for p in ps]
    assert all(found == {p.solution.split()[1]} for found, p in zip(ops, ps, strict=True))
    shares = collections.Counter(op for found in ops for op in found)
    assert all(abs(shares[op] / len(ps) - 0.25) < 0.04 for op in "+-*/"), shares
    assert all(1 <= n <= num_max for p in ps for n in p.nums) and all(1 <= p.target <= target_max for p in ps)
    # The draw the generator makes without balance_ops: the sum alone solves half (or more) of the puzzles.
    plain = generate(2000, seed=3, cfg=dataclasses.replace(cfg, balance_ops=False))
    assert sum("+" in _solving_ops(p.nums, p.target) for p in plain) / len(plain) > 0.45


def test_balanced_ops_deterministic_and_prefix_stable(monkeypatch):
    monkeypatch.setattr(puzzles, "BLOCK", 16)
    cfg = PuzzleConfig(counts=(2,), num_max=9, target_min=1, target_max=18, balance_ops=True)
    a = generate(40, seed=5, cfg=cfg)
    assert generate(23, seed=5, cfg=cfg) == a[:23] and generate(40, seed=6, cfg=cfg) != a


def test_balanced_heldout_and_train(monkeypatch):
    """The held-out set: distinct, a quarter of each operation, at most half of any operation's puzzles. The training
    stream: the stream's order of operations kept when held-out puzzles are excluded, and prefix-stable."""
    monkeypatch.setattr(puzzles, "BLOCK", 64)
    cfg = PuzzleConfig(counts=(2,), num_max=9, target_min=1, target_max=18, balance_ops=True)
    alone = collections.Counter(  # puzzles one operation alone solves, counted over every pair and target
        found.pop() for x in range(1, 10) for y in range(x, 10) for t in range(1, 19)
        if len(found := _solving_ops((x, y), t)) == 1)
    assert puzzles.op_space(cfg) == alone == {"+": 44, "-": 35, "*": 12, "/": 13}
    held = balanced_heldout(24, 1, cfg)
    assert len({p.key for p in held}) == 24
    assert collections.Counter(map(puzzles.operation, held)) == dict.fromkeys("+-*/", 6)
    with pytest.raises(ValueError, match="num_test 25: .* \\* alone makes 12: at most 24"):
        balanced_heldout(25, 1, cfg)
    exclude = {p.key for p in held}
    plain = generate(300, 2, cfg)
    train = balanced_train(300, 2, cfg, exclude)
    assert [puzzles.operation(p) for p in train] == [puzzles.operation(p) for p in plain]
    assert not exclude & {p.key for p in train} and train[:100] == balanced_train(100, 2, cfg, exclude)
    assert balanced_train(300, 2, cfg, set()) == plain  # nothing excluded: the stream itself


def test_balanced_ops_need_every_operation_in_range():
    """5 and 5 make 10, 25 and 1, never a difference of at least 1: balance_ops cannot draw a subtraction."""
    cfg = PuzzleConfig(counts=(2,), num_min=5, num_max=5, target_min=1, target_max=25, balance_ops=True)
    with pytest.raises(ValueError, match="by - alone .*widen the ranges"):
        generate(1, seed=0, cfg=cfg)


def test_puzzle_key_ignores_order():
    assert Puzzle((3, 1, 2), 6).key == Puzzle((1, 2, 3), 6, "1 + 2 + 3").key == ((1, 2, 3), 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Puzzle((1,), 1).target = 2


@pytest.mark.parametrize("k, hi", [(2, 12), (3, 12), (3, 99), (4, 9), (4, 99)])
def test_batched_search_agrees_with_python_search(k, hi):
    """The numpy search finds a solution exactly when solve(integer_only=True) does, and it scores 1.0."""
    rng = np.random.default_rng(k * 1000 + hi)
    nums = rng.integers(1, hi, size=(150, k), endpoint=True)
    targets = rng.integers(1, 100, size=150, endpoint=True)
    found = puzzles._solve_rows(nums, targets)
    templates = puzzles._final_templates(k)
    for row, t, index in zip(nums.tolist(), targets.tolist(), found.tolist(), strict=True):
        assert (index >= 0) == (solve(row, t, integer_only=True) is not None), (row, t)
        if index >= 0:
            assert score(f"<answer>{templates[index].format(*row)}</answer>", row, t) == 1.0, (row, t)


@pytest.mark.parametrize(
    "nums, target, integer_only, solvable",
    [
        ([1, 3, 4, 6], 24, False, True),  # 6 / (1 - 3 / 4): needs a fraction on the way
        ([1, 3, 4, 6], 24, True, False),
        ([2, 3], 6, True, True),
        ([1, 1], 5, False, False),
        ([7], 7, False, True),
        ([3, 3, 8, 8], 24, False, True),  # 8 / (3 - 8 / 3)
        ([5, 5, 5, 1], 24, False, True),  # (5 - 1 / 5) * 5
        ([10, 4, 4, 7], 10, True, True),  # 10 + (4 - 4) * 7: zero as an intermediate
        ([3, 0], 0, False, True),
        ([], 0, False, False),
    ],
)
def test_solve_known_puzzles(nums, target, integer_only, solvable):
    solution = solve(nums, target, integer_only=integer_only)
    assert (solution is not None) == solvable
    if solution is not None:
        assert score(f"<answer>{solution}</answer>", nums, target) == 1.0, solution


def test_solve_random_puzzles_score_one():
    """Rational solve finds at least what the integer search finds, and its answers score 1.0."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        nums = rng.integers(1, 13, size=int(rng.integers(2, 5))).tolist()
        target = int(rng.integers(1, 50))
        rational, integral = solve(nums, target), solve(nums, target, integer_only=True)
        assert integral is None or rational is not None
        for solution in (rational, integral):
            if solution is not None:
                assert score(f"<answer>{solution}</answer>", nums, target) == 1.0, (nums, target, solution)
