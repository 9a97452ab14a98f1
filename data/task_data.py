"""The puzzles of a run: per difficulty level, a training list and a held-out list (what bin/train's --curriculum,
--data_file, --num_train_puzzles, --eval_size and --seed describe). The Task around them (prompts, tokenizer,
scoring) is grpo/tasks.py's CountdownTask."""

from __future__ import annotations

from pathlib import Path

from data import curriculum, tinyzero


def level_puzzles(ladder: str, shaping: str, data_file: str | None, num_train: int, eval_size: int, seed: int):
    """(levels, train lists, held-out lists), easiest level first. The top level is TinyZero's: its puzzles come
    from data_file when given (TinyZero's train / test split of it, or bin/make_dataset's pair; its training rows
    less any level's held-out puzzle), else are generated like the others: held-out
    from the level's own seed (the same puzzles in every run), train from the run's seed. Bad input: ValueError
    naming the flag."""
    try:
        levels = curriculum.ladder(ladder, shaping=shaping)
    except ValueError as e:
        raise ValueError(f"--curriculum: {e}") from None
    top = _tinyzero_splits(data_file, eval_size) if data_file else None
    try:  # held-out first: no level trains on any level's held-out puzzle (nor on the data file's test rows)
        tests = [curriculum.heldout_split(level, eval_size) for level in levels[:-1]]
        tests.append(top[1] if top else curriculum.heldout_split(levels[-1], eval_size))
        exclude = {p.key for test in tests for p in test}
        trains = [curriculum.train_split(level, num_train, seed, exclude) for level in levels[:-1]]
        trains.append([p for p in top[0] if p.key not in exclude] if top  # the file's rows, less the held-out
                      else curriculum.train_split(levels[-1], num_train, seed, exclude))
    except ValueError as e:  # a level with fewer distinct puzzles than asked for
        raise ValueError(f"--eval_size / --num_train_puzzles: {e}") from None
    if top and not trains[-1]:
        raise ValueError(f"--data_file: every training row of {data_file} is a held-out puzzle")
    return levels, trains, tests


def _made_splits(data_file: str) -> Path | None:
    """The directory of a bin/make_dataset output that data_file names (the directory, or its train.jsonl beside
    a test.jsonl), else None."""
    path = Path(data_file)
    base = path if path.is_dir() else path.parent if path.name == "train.jsonl" else None
    return base if base is not None and (base / "train.jsonl").is_file() and (base / "test.jsonl").is_file() else None


def _tinyzero_splits(data_file: str, eval_size: int):
    """(train, test) of TinyZero's data file, split as TinyZero's preprocessing does, or of bin/make_dataset's
    train.jsonl / test.jsonl (whole: its test split shares no puzzle with train); ValueError naming the flag."""
    try:
        if made := _made_splits(data_file):
            train = tinyzero.load_puzzles(made / "train.jsonl")
            test = tinyzero.load_puzzles(made / "test.jsonl")[:eval_size]
        else:
            train = tinyzero.load_puzzles(data_file, *tinyzero.TINYZERO_TRAIN)
            test = tinyzero.load_puzzles(data_file, *tinyzero.TINYZERO_TEST)[:eval_size]
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ValueError(f"--data_file: {e} (expected TinyZero's Countdown-Tasks-3to4: its train split is rows "
                         f"{tinyzero.TINYZERO_TRAIN}, its test split {tinyzero.TINYZERO_TEST}; or bin/make_dataset's "
                         "--out directory; without --data_file the puzzles are generated)") from None
    if not train:
        raise ValueError(f"--data_file: no training rows in {data_file}")
    if len(test) < eval_size:
        raise ValueError(f"--eval_size {eval_size}: {data_file} has only {len(test)} held-out (test) rows; ask for "
                         "at most that many")
    return train, test
