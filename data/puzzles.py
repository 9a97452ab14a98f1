"""Seeded Countdown puzzles, each checked solvable by an exhaustive search.

Sampling copies the Stream-of-Search generator that TinyZero's data is believed to come from: draw
the target uniformly from its range and the count of numbers from `counts`, then redraw the numbers
uniformly until some expression reaches the target with every intermediate value a non-negative
integer (+, *, non-negative -, exact /). So targets are uniform, and each puzzle's numbers are the
first of an i.i.d. stream that can reach its target, exactly as there. (`PuzzleConfig.balance_ops` draws
2-number puzzles operation first instead, for the balanced ladder: see the field.)

Speed. That rejection loop needs ~7 draws per 4-number puzzle and ~30 per 3-number one, so a check
must cost microseconds; the Python `solve` takes hundreds. `_solve_rows` checks a batch of candidate
rows at once in numpy: rows on the last axis so inner loops are long, float64 holding exact integers,
NaN for a step Stream-of-Search forbids. Pairs are enumerated forward; larger sets are searched
backward: for each cut of the set into (small, large), each value a of the small side and each op,
the partner the target needs (t - a, a - t, t + a, t / a, a / t, t * a) is compared with the values of
the large side, or searched for in it the same way. Each comparison is one template such as
"({1} + ({0} * {2}))"; the first that matches, filled with the numbers, is the stored solution.

`solve` is the plain Python search for single puzzles. It defaults to exact rationals, so it finds
every solution the reward accepts (6 / (1 - 3 / 4) = 24 has a fractional intermediate).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

BLOCK = 2048  # puzzles drawn per numpy batch; generate(n) is a prefix of generate(n + m) for any block size
_MAX_ROWS_ELEMENTS = 1 << 22  # rows x templates per comparison chunk: ~4 MB of booleans
_MAX_DRAWS_PER_ROUND = 64
_EXACT_FLOAT = 2**53  # below this float64 +, -, * on integers are exact and a non-integral quotient stays one


@dataclasses.dataclass(frozen=True)
class Puzzle:
    nums: tuple[int, ...]
    target: int
    solution: str = ""  # an expression using every number once; "" when unknown (TinyZero rows)

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication: the same numbers in any order with the same target."""
        return tuple(sorted(self.nums)), self.target


@dataclasses.dataclass(frozen=True)
class PuzzleConfig:
    counts: tuple[int, ...] = (3, 4)  # how many numbers a puzzle has, drawn uniformly
    num_min: int = 1
    num_max: int = 99
    target_min: int = 10
    target_max: int = 100
    max_draws: int = 100_000  # draws of numbers for one target before deciding the ranges cannot work
    # Two numbers only: draw the operation first (each of + - * / a quarter of the puzzles), then a target in range
    # it reaches (uniformly), then the numbers (uniformly among the ordered pairs that reach the target by that
    # operation and no other: each operation solves exactly its quarter). Why: with the target drawn first and the
    # numbers kept once ANY operation reaches it, two numbers most often reach it by their sum, so one fixed
    # answer, `a + b`, solves half of such puzzles (BUILD.md, "Balanced operations").
    balance_ops: bool = False

    def __post_init__(self):
        # Each message starts with the field's name, which is bin/make_dataset's flag (it adds the "--").
        if not self.counts or not all(2 <= k <= 4 for k in self.counts):
            raise ValueError(f"counts must list numbers of operands in 2..4, got {self.counts} (PuzzleConfig)")
        if not 1 <= self.num_min <= self.num_max:
            raise ValueError(f"num_min must be >= 1 and <= num_max, got num_min {self.num_min}, num_max "
                             f"{self.num_max} (PuzzleConfig)")
        if not 1 <= self.target_min <= self.target_max:
            raise ValueError(f"target_min must be >= 1 and <= target_max, got target_min {self.target_min}, "
                             f"target_max {self.target_max} (PuzzleConfig)")
        if max(self.num_max, self.target_max) ** (max(self.counts) + 1) >= _EXACT_FLOAT:
            raise ValueError(f"num_max {self.num_max} / target_max {self.target_max}: ranges too large for the "
                             f"float64 search (PuzzleConfig)")
        if self.max_draws < 1:
            raise ValueError(f"max_draws must be >= 1, got {self.max_draws} (PuzzleConfig)")
        if self.balance_ops and tuple(self.counts) != (2,):
            raise ValueError(f"balance_ops draws 2-number puzzles only, got counts {self.counts} (PuzzleConfig)")


def max_puzzles(cfg: PuzzleConfig) -> int:
    """An upper bound on the distinct puzzles of cfg: multisets of numbers times targets, solvable or not."""
    values = cfg.num_max - cfg.num_min + 1
    return sum(math.comb(values + k - 1, k) for k in set(cfg.counts)) * (cfg.target_max - cfg.target_min + 1)


def check_splits(num_test: int, cfg: PuzzleConfig) -> None:
    """make_splits' checks that need no drawing, each a ValueError starting with the field or size to change: the
    targets within reach (first: an unreachable target shrinks the space), num_test within the space's bound."""
    _check_reachable(cfg)
    if num_test > max_puzzles(cfg):
        raise ValueError(f"num_test {num_test} is more than the {max_puzzles(cfg)} distinct puzzles (numbers x "
                         f"targets, solvable or not) the ranges of {cfg} allow: the puzzle space is too small")


def _check_reachable(cfg: PuzzleConfig) -> None:
    """No target may lie above what the smallest count of numbers can make: the generator draws every count with
    every target, and would spend max_draws on such a target before failing. k numbers make at most num_max ** k
    (for x, y >= 2, x * y >= x + y), or k when every number is 1. A target below that bound may still be
    unreachable (a prime just under it); the draws find that out."""
    k = min(cfg.counts)
    reach = cfg.num_max**k if cfg.num_max >= 2 else k
    if cfg.target_max > reach:
        raise ValueError(f"target_max {cfg.target_max} is out of reach: {k} numbers in {cfg.num_min}..{cfg.num_max} "
                         f"make at most {reach}; widen the ranges of {cfg}")


def generate(n: int, seed: int, cfg: PuzzleConfig = PuzzleConfig()) -> list[Puzzle]:
    """n puzzles from `seed`; deterministic, and generate(k, s) is a prefix of generate(k + m, s)."""
    if n < 0:
        raise ValueError(f"generate needs n >= 0, got {n}")
    _check_reachable(cfg)
    return list(itertools.islice(_stream(seed, cfg), n))


def make_splits(
    num_train: int, num_test: int, seed: int, cfg: PuzzleConfig = PuzzleConfig()
) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, test) from one seeded stream: test puzzles are distinct, and train contains none of them.

    Train may repeat a puzzle (it is a sample, like TinyZero's rows); test never does, so an
    evaluation counts each puzzle once.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"make_splits needs non-negative sizes, got num_train={num_train}, num_test={num_test}")
    check_splits(num_test, cfg)
    train: list[Puzzle] = []
    test: list[Puzzle] = []
    test_keys: set[tuple[tuple[int, ...], int]] = set()
    budget = 10 * (num_train + num_test) + 1000  # a tiny puzzle space (numbers 1..2) must not loop forever
    for drawn, puzzle in enumerate(_stream(seed, cfg)):
        if len(test) == num_test and len(train) == num_train:
            break
        if drawn == budget:
            raise ValueError(
                f"num_test {num_test} / num_train {num_train}: drew {budget} puzzles but found only {len(test)}/"
                f"{num_test} distinct test and {len(train)}/{num_train} train puzzles: the puzzle space of {cfg} is "
                "too small"
            )
        if len(test) < num_test:
            if puzzle.key not in test_keys:
                test_keys.add(puzzle.key)
                test.append(puzzle)
        elif puzzle.key not in test_keys:
            train.append(puzzle)
    return train, test


def stream(seed: int, cfg: PuzzleConfig) -> Iterator[Puzzle]:
    """The endless seeded stream that generate() returns prefixes of."""
    _check_reachable(cfg)
    return _stream(seed, cfg)


def _stream(seed: int, cfg: PuzzleConfig) -> Iterator[Puzzle]:
    for block in itertools.count():
        yield from _block(np.random.default_rng([seed, block]), cfg)


def _block(rng: np.random.Generator, cfg: PuzzleConfig) -> list[Puzzle]:
    """BLOCK puzzles: targets and counts first, then rounds of candidate numbers for the unsolved ones
    (balance_ops: after those two draws, which it does not use, its own draws puzzle by puzzle)."""
    targets = rng.integers(cfg.target_min, cfg.target_max, size=BLOCK, endpoint=True)
    counts = rng.choice(np.array(cfg.counts), size=BLOCK)
    if cfg.balance_ops:
        return [_balanced_puzzle(rng, cfg) for _ in range(BLOCK)]
    puzzles: list[Puzzle | None] = [None] * BLOCK
    for k in sorted(set(cfg.counts)):
        templates = _final_templates(k)
        pending = np.flatnonzero(counts == k)
        drawn = rows = hits = 0
        while pending.size:
            # Each puzzle takes the first hit of its own i.i.d. draws, as Stream-of-Search's loop does.
            # Several draws a round only save numpy calls: a quarter of the draws a hit has needed so far.
            draws = int(np.clip(rows // (4 * hits) if hits else 1, 1, _MAX_DRAWS_PER_ROUND))
            if drawn + draws > cfg.max_draws:
                raise ValueError(
                    f"target_min..target_max {cfg.target_min}..{cfg.target_max}: no {k} numbers in {cfg.num_min}.."
                    f"{cfg.num_max} reached target {targets[pending[0]]} in {drawn} draws: widen the ranges of {cfg}"
                )
            cand = rng.integers(cfg.num_min, cfg.num_max, size=(pending.size, draws, k), endpoint=True)
            found = _solve_rows(cand.reshape(-1, k), np.repeat(targets[pending], draws)).reshape(pending.size, draws)
            solved = (found >= 0).any(axis=1)
            first = (found >= 0).argmax(axis=1)
            for row in np.flatnonzero(solved):
                nums = tuple(int(x) for x in cand[row, first[row]])
                expression = templates[found[row, first[row]]].format(*nums)[1:-1]  # drop the outer parentheses
                puzzles[pending[row]] = Puzzle(nums=nums, target=int(targets[pending[row]]), solution=expression)
            drawn, rows, hits = drawn + draws, rows + found.size, hits + int(solved.sum())
            pending = pending[~solved]
    return puzzles  # type: ignore[return-value]  # every slot was filled above


def _balanced_puzzle(rng: np.random.Generator, cfg: PuzzleConfig) -> Puzzle:
    """A 2-number puzzle (balance_ops): an operation, a target it reaches in range, a pair it reaches it from."""
    table = _op_targets(cfg.num_min, cfg.num_max, cfg.target_min, cfg.target_max)
    op, by_target = table[rng.integers(len(table))]
    target, pairs = by_target[rng.integers(len(by_target))]
    x, y = (int(v) for v in pairs[rng.integers(len(pairs))])
    a, b = (x, y) if _BALANCED_OPS[op](x, y) == target else (y, x)
    return Puzzle(nums=(x, y), target=target, solution=f"{a} {op} {b}")


# The generator's operations on a pair, as Stream-of-Search allows them: NaN for a negative difference or an inexact
# quotient, which no target equals.
_BALANCED_OPS = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: np.where(x >= y, x - y, np.nan),
    "*": lambda x, y: x * y,
    "/": lambda x, y: np.where(x % y == 0, x // y, np.nan),
}


@functools.cache
def _op_targets(num_min: int, num_max: int, target_min: int, target_max: int) -> tuple:
    """Per operation: (op, ((target, ordered pairs [n, 2] that reach target by op and by no other operation), ...))
    over the targets in range it so reaches. Only by op: else 8 / 1 = 8 * 1 = 8 and 2 + 2 = 2 * 2 would make `a * b`
    and `a + b` pay beyond their quarter. ValueError naming the ranges when an operation reaches none."""
    x, y = (v.ravel() for v in np.meshgrid(*[np.arange(num_min, num_max + 1)] * 2, indexing="ij"))
    reach = {op: (apply(x, y), apply(y, x)) for op, apply in _BALANCED_OPS.items()}  # both orders
    out = []
    for op in _BALANCED_OPS:
        by_target = []
        for t in range(target_min, target_max + 1):
            hits = {o: (forward == t) | (backward == t) for o, (forward, backward) in reach.items()}
            only = hits.pop(op) & ~np.logical_or.reduce(list(hits.values()))
            if only.any():
                by_target.append((t, np.stack([x[only], y[only]], axis=1)))
        if not by_target:
            raise ValueError(f"target_min..target_max {target_min}..{target_max}: no 2 numbers in {num_min}..{num_max}"
                             f" reach a target in range by {op} alone (balance_ops draws every operation): widen the "
                             "ranges")
        out.append((op, tuple(by_target)))
    return tuple(out)


OPS = tuple(_BALANCED_OPS)


def operation(puzzle: Puzzle) -> str:
    """The operation of a balance_ops puzzle (its stored solution is "a op b")."""
    return puzzle.solution.split()[1]


def op_space(cfg: PuzzleConfig) -> dict[str, int]:
    """balance_ops: how many distinct puzzles (numbers in any order, target) each operation makes."""
    table = _op_targets(cfg.num_min, cfg.num_max, cfg.target_min, cfg.target_max)
    return {op: len({(tuple(sorted(int(n) for n in pair)), t) for t, pairs in by_target for pair in pairs})
            for op, by_target in table}


# ---- the batched integer search ----

# Forward operations for pairs, in `_combine`'s column order.
_OP_FORMATS = ("({a} + {b})", "({a} * {b})", "({a} - {b})", "({b} - {a})", "({a} / {b})", "({b} / {a})")
# The partner b that `a op b == t` needs, given a and t, in `_match`'s column order.
_PARTNER_FORMATS = ("({a} + {b})", "({a} - {b})", "({b} - {a})", "({a} * {b})", "({a} / {b})", "({b} / {a})")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The search for k numbers. Subsets are bitmasks over positions; expressions are format templates.

    Pairs (and single numbers) are enumerated forward. Larger sets are searched backward: for each
    cut (small, large), each value a of the small side and each op, the partner the target needs is
    looked for in the large side, itself searched backward if it has three or more numbers. With at
    most four numbers the small side is always a single number or a pair.
    """

    pairs: tuple[int, ...]  # subsets enumerated forward
    cuts: dict  # subset -> ((small, large), ...): each unordered cut once, smaller side first
    forward_templates: dict  # forward subset -> templates, in the row order of its value array
    templates: dict  # backward subset -> templates, in the row order of its `_match` array


@functools.cache
def _plan(k: int) -> _Plan:
    full = (1 << k) - 1
    forward = {1 << i: ["{" + str(i) + "}"] for i in range(k)}  # "{2}" is filled by the third number
    backward: dict[int, list[str]] = {}
    cuts, pairs = {}, []
    for mask in sorted(range(1, full + 1), key=lambda m: (m.bit_count(), m)):
        if mask.bit_count() < 2:
            continue
        low = mask & -mask  # sub-masks holding the lowest element list each unordered cut exactly once
        halves = ((s, mask ^ s) for s in _submasks(mask) if s & low and s != mask)
        cuts[mask] = tuple(tuple(sorted(h, key=int.bit_count)) for h in halves)
        if mask.bit_count() == 2 and mask != full:
            pairs.append(mask)
            forward[mask] = [
                f.format(a=a, b=b) for (x, y) in cuts[mask] for a in forward[x] for b in forward[y] for f in _OP_FORMATS
            ]
        else:
            backward[mask] = [
                f.format(a=a, b=b)
                for small, large in cuts[mask]
                for a in forward[small]
                for f in _PARTNER_FORMATS
                for b in forward.get(large) or backward[large]
            ]
    return _Plan(tuple(pairs), cuts, forward, backward)


def _submasks(mask: int) -> Iterator[int]:
    sub = mask
    while sub:
        yield sub
        sub = (sub - 1) & mask


def _solve_rows(nums: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row of nums [R, k], the index into _final_templates(k) of the first solution, or -1."""
    k = nums.shape[1]
    plan = _plan(k)
    chunk = max(1, _MAX_ROWS_ELEMENTS // len(_final_templates(k)))
    found = [_solve_chunk(nums[i : i + chunk].T, targets[i : i + chunk], plan) for i in range(0, len(nums), chunk)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _final_templates(k: int) -> list[str]:
    return _plan(k).templates[(1 << k) - 1]


def _solve_chunk(nums: np.ndarray, targets: np.ndarray, plan: _Plan) -> np.ndarray:
    """nums [k, R] -> [R] template indices. Rows are the last axis so numpy's inner loops are long."""
    values = {1 << i: nums[i : i + 1].astype(np.float64) for i in range(len(nums))}  # [1, R]
    # NaN marks a value Stream-of-Search forbids; x / 0 and sqrt(-1) make them without branches.
    with np.errstate(divide="ignore", invalid="ignore"):
        for mask in plan.pairs:
            ((x, y),) = plan.cuts[mask]
            values[mask] = _combine(values[x], values[y])
        blocks = _match_blocks((1 << len(nums)) - 1, targets.astype(np.float64), values, plan)
        found, offset = np.full(len(targets), -1), 0
        for block in blocks:  # [templates of one cut, R]; argmax only where needed, it is the slow part
            new = block.any(axis=0) & (found < 0)
            if new.any():
                found[new] = offset + block[:, new].argmax(axis=0)
            offset += len(block)
    return found


def _match_blocks(mask: int, t: np.ndarray, values: dict, plan: _Plan) -> Iterator[np.ndarray]:
    """Whether each of plan.templates[mask] equals t: t [*Q, R] -> bool [templates, *Q, R], one block a cut."""
    ones = (1,) * (t.ndim - 1)
    for small, large in plan.cuts[mask]:
        a = values[small].reshape(-1, 1, *ones, t.shape[-1])  # [S, 1, *Q, R]
        # In _PARTNER_FORMATS order; a / b = t and b / a = t need a != 0 (targets >= 1 rule out 0 / 0).
        partner = np.concatenate([t - a, a - t, t + a, t / a, _nonzero(a) / t, t * _nonzero(a)], axis=1)
        if large in values:  # NaN, inf and fractions never equal a value: values are non-negative integers
            found = partner[:, :, None] == values[large].reshape(1, 1, -1, *ones, t.shape[-1])  # [S, 6, L, *Q, R]
        else:  # an inner target must itself be a value Stream-of-Search allows
            inner = np.concatenate(list(_match_blocks(large, _exact(_nonnegative(partner)), values, plan)))
            found = np.moveaxis(inner, 0, 2)  # [L, S, 6, *Q, R] -> [S, 6, L, *Q, R]
        yield found.reshape(-1, *t.shape)


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All values `x op y` for x in a [m, R], y in b [n, R] -> [m * n * 6, R]; NaN where not allowed.

    Branch-free: a NaN marks a step Stream-of-Search forbids, made by a square root of a negative
    number (np.where costs ~10x an add here), and NaN stays NaN through every later step.
    """
    x, y = a[:, None, :], b[None, :, :]  # [m, 1, R], [1, n, R]
    out = np.empty((len(a), len(b), 6, a.shape[1]))  # [m, n, 6, R], in _OP_FORMATS order
    np.add(x, y, out=out[:, :, 0])
    np.multiply(x, y, out=out[:, :, 1])
    out[:, :, 2] = _nonnegative(x - y)
    out[:, :, 3] = _nonnegative(y - x)
    out[:, :, 4] = _exact(x / y)
    out[:, :, 5] = _exact(y / x)
    return out.reshape(-1, a.shape[1])


def _nonnegative(v: np.ndarray) -> np.ndarray:
    return v - np.sqrt(np.minimum(v, 0))  # sqrt(0) = 0 keeps v; a negative gives NaN


def _exact(q: np.ndarray) -> np.ndarray:
    return q + np.sqrt(np.floor(q) - q)  # 0 for an integer; NaN for a fraction, and for x / 0 = inf


def _nonzero(v: np.ndarray) -> np.ndarray:
    return np.where(v != 0, v, np.nan)


# ---- the plain Python search, over rationals by default ----

Value = int | Fraction


def solve(nums: tuple[int, ...] | list[int], target: int, *, integer_only: bool = False) -> str | None:
    """One expression using every number exactly once that equals target, or None if there is none.

    integer_only=False searches all rational intermediate values (everything the reward accepts);
    True only non-negative integers (the generator's rule).
    """
    key = tuple(sorted(int(n) for n in nums))
    if not key:
        return None
    expression = _derive(key, target if integer_only else Fraction(target), integer_only)
    if expression is None or len(key) == 1:
        return expression
    return expression[1:-1]  # drop the outermost parentheses


def _derive(nums: tuple[int, ...], goal: Value, integer_only: bool) -> str | None:
    """A fully parenthesized expression over the sorted multiset nums equal to goal, or None."""
    if len(nums) == 1:
        return str(nums[0]) if nums[0] == goal else None
    for left, right in _cuts(nums):
        left_values, right_values = _values(left, integer_only), _values(right, integer_only)
        if len(left_values) > len(right_values):  # walk the smaller side, look up in the larger
            left, right, left_values, right_values = right, left, right_values, left_values
        for a in left_values:
            found = _partner(a, goal, right_values, integer_only)
            if found is not None:
                fmt, b = found
                return fmt.format(a=_derive(left, a, integer_only), b=_derive(right, b, integer_only))
    return None


def _partner(a: Value, t: Value, others: frozenset, integer_only: bool) -> tuple[str, Value] | None:
    """(template, b) with b in others such that the template's `a op b` equals t, or None."""
    candidates = [("({a} + {b})", t - a), ("({a} - {b})", a - t), ("({b} - {a})", t + a)]
    if a != 0:
        if not integer_only or t % a == 0:
            candidates.append(("({a} * {b})", t // a if integer_only else t / a))
        candidates.append(("({b} / {a})", t * a))
        if t != 0 and (not integer_only or a % t == 0):
            candidates.append(("({a} / {b})", a // t if integer_only else a / t))  # b != 0 because a != 0
    elif t == 0:  # 0 * b is 0 for any b
        candidates.extend(("({a} * {b})", b) for b in itertools.islice(others, 1))
    return next(((fmt, b) for fmt, b in candidates if b in others), None)


@functools.lru_cache(maxsize=1 << 12)
def _values(nums: tuple[int, ...], integer_only: bool) -> frozenset:
    """Every value an expression using each of nums exactly once can take."""
    if len(nums) == 1:
        return frozenset([nums[0] if integer_only else Fraction(nums[0])])
    out: set = set()
    for left, right in _cuts(nums):
        for a, b in itertools.product(_values(left, integer_only), _values(right, integer_only)):
            out.update((a + b, a * b))
            if integer_only:
                out.add(abs(a - b))  # non-negative subtraction, in whichever order
                out.update(p // q for p, q in ((a, b), (b, a)) if q and p % q == 0)
            else:
                out.update((a - b, b - a))
                out.update(p / q for p, q in ((a, b), (b, a)) if q)
    return frozenset(out)


@functools.lru_cache(maxsize=1 << 12)
def _cuts(nums: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Each way to cut a sorted multiset into two non-empty sorted parts, once per distinct pair."""
    found = {}
    for mask in _submasks((1 << len(nums)) - 2):  # the first element always goes right: each cut once
        left = tuple(n for i, n in enumerate(nums) if mask >> i & 1)
        right = tuple(n for i, n in enumerate(nums) if not mask >> i & 1)
        found.setdefault((min(left, right), max(left, right)), (left, right))  # repeated numbers repeat cuts
    return tuple(found.values())
