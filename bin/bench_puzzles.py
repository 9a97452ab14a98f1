"""Benchmark: how fast data.puzzles generates solvable puzzles (and how fast the reward scores them).

    bin/bench_puzzles --n 100000

A measurement to report, never a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import time

from absl import flags

from bin import cli
from data.countdown import score
from data.puzzles import generate

F = flags.FLAGS
flags.DEFINE_integer("n", 100_000, "Puzzles to generate.")
flags.DEFINE_integer("seed", 0, "Generator seed.")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.check_at_least(1, "n")
    wall, cpu = time.perf_counter(), time.process_time()
    puzzles = generate(F.n, F.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"generate: {F.n} puzzles in {wall:.2f} s wall ({F.n / wall:,.0f} puzzles/s), {cpu:.2f} s CPU")
    completions = [f"</think>\n<answer>{p.solution}</answer>" for p in puzzles]
    start = time.perf_counter()
    solved = sum(score(c, p.nums, p.target) == 1.0 for c, p in zip(completions, puzzles, strict=True))
    elapsed = time.perf_counter() - start
    print(f"score: {F.n / elapsed:,.0f} completions/s; {solved}/{F.n} stored solutions score 1.0")


if __name__ == "__main__":
    cli.run(main)
