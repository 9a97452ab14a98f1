"""Generate Countdown train/test splits as JSONL, each puzzle checked solvable.

    bin/make_dataset --num_train 100000 --num_test 1024 --seed 0 --out data/countdown
    # writes data/countdown/train.jsonl and data/countdown/test.jsonl, rows like
    # {"target": 87, "nums": [96, 21, 5, 25], "solution": "21 + ((96 - 25) - 5)"}

`bin/train --data_file data/countdown` trains on them (the top level's puzzles; data.tinyzero.load_puzzles reads
them back). The test split is distinct and shares no puzzle with train.
"""

from __future__ import annotations

import time

from absl import flags

from bin import cli
from data.puzzles import PuzzleConfig, check_splits, make_splits
from data.tinyzero import save_splits

F = flags.FLAGS
flags.DEFINE_integer("num_train", 100_000, "Training puzzles.")
flags.DEFINE_integer("num_test", 1024, "Test puzzles (distinct, none of them in train).")
flags.DEFINE_integer("seed", 0, "Generator seed; the same seed gives the same files.")
flags.DEFINE_string("out", None, "Output directory (created if missing).")
flags.DEFINE_list("counts", ["3", "4"], "How many numbers a puzzle may have (2..4), drawn uniformly.")
flags.DEFINE_integer("num_min", 1, "Smallest number.")
flags.DEFINE_integer("num_max", 99, "Largest number.")
flags.DEFINE_integer("target_min", 10, "Smallest target.")
flags.DEFINE_integer("target_max", 100, "Largest target.")
flags.DEFINE_integer("show", 5, "Print this many test puzzles with their solutions.")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.expand_user("out")
    if not F.out:
        raise cli.FlagError("--out is required: the directory for train.jsonl and test.jsonl")
    cli.check_at_least(0, "num_train", "num_test", "show")
    counts = tuple(cli.integers("counts"))
    with cli.flag_errors("--"):  # each message starts with a field of the config or a size: the flag's name
        cfg = PuzzleConfig(counts, F.num_min, F.num_max, F.target_min, F.target_max)
        check_splits(F.num_test, cfg)
    cli.check_writable_dir("out", F.out)  # last of the checks (it makes the directory), before any work
    start = time.perf_counter()
    with cli.flag_errors("--"):
        train, test = make_splits(F.num_train, F.num_test, F.seed, cfg)
    elapsed = time.perf_counter() - start
    with cli.flag_errors("--out: ", (ValueError, OSError)):  # both files replaced together, or neither
        save_splits(F.out, {"train": train, "test": test})
    print(f"wrote {len(train)} train and {len(test)} test puzzles to {F.out} ({elapsed:.1f} s to generate)")
    for p in (test or train)[: F.show]:
        print(f"  nums={list(p.nums)} target={p.target}  solution: {p.solution}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
