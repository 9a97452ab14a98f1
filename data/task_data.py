"""The puzzles of a run: per difficulty level, a training list and a held-out list (what bin/train's --curriculum,
--data_file, --num_train_puzzles, --eval_size and --seed describe). The Task around them (prompts, tokenizer,
scoring) is grpo/tasks.py's CountdownTask."""

from __future__ import annotations

from data import curriculum, puzzles, tinyzero


def level_puzzles(ladder: str, shaping: str, data_file: str | None, num_train: int, eval_size: int, seed: int):
    """(levels, train lists, held-out lists), easiest level first. The top level is TinyZero's: its puzzles come
    from data_file when given (TinyZero's train / test split of it), else are generated from the seed. Bad input:
    ValueError naming the flag."""
    try:
        levels = curriculum.ladder(ladder, shaping=shaping)
    except ValueError as e:
        raise ValueError(f"--curriculum: {e}") from None
    if data_file:
        try:
            train = tinyzero.load_puzzles(data_file, *tinyzero.TINYZERO_TRAIN)
            test = tinyzero.load_puzzles(data_file, *tinyzero.TINYZERO_TEST)[:eval_size]
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise ValueError(f"--data_file: {e}") from None
        if not train:
            raise ValueError(f"--data_file: no training rows in {data_file}")
    elif len(levels) == 1:  # no curriculum: held-out puzzles from the run's seed
        train, test = puzzles.make_splits(num_train, eval_size, seed)
    else:
        train, test = curriculum.level_splits(levels[-1], num_train, eval_size, seed)
    easier = [curriculum.level_splits(level, num_train, eval_size, seed) for level in levels[:-1]]
    return levels, [*(t for t, _ in easier), train], [*(h for _, h in easier), test]
