"""Load Countdown puzzles from a local file: TinyZero's data set or our own generated JSONL.

TinyZero trains on `Jiayi-Pan/Countdown-Tasks-3to4` (490,364 rows of {"target": int, "nums": [int]},
shipped as Parquet): rows [0, 327680) for training and the next 1,024 for testing. Download it
yourself (this project never fetches data) and pass the file; `.jsonl`/`.json` lines in the same
shape work too, and so do the files `bin/make_dataset` writes, whose rows add a "solution".
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from data.puzzles import Puzzle

TINYZERO_TRAIN = (0, 327680)  # row ranges as TinyZero's examples/data_preprocess/countdown.py takes them
TINYZERO_TEST = (327680, 328704)

_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)


def load_puzzles(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> list[Puzzle]:
    """Rows [start, stop) of a JSONL or Parquet file as Puzzles (solution "" where the file has none).

    Raises FileNotFoundError for a missing file and ValueError, naming the file and row, for bad rows,
    unknown suffixes or a range the file does not have.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Countdown data file at {path!r}")
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"bad row range [{start}, {stop}) for {path}: need 0 <= start <= stop")
    if path.endswith(_JSONL_SUFFIXES):
        rows = _jsonl_rows(path, start, stop)
    elif path.endswith(_PARQUET_SUFFIXES):
        rows = _parquet_rows(path, start, stop)
    else:
        raise ValueError(f"{path}: expected a {' or '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)} file")
    return [_puzzle(row, path, where) for where, row in rows]


def save_puzzles(path: str | os.PathLike, puzzles: list[Puzzle]) -> None:
    """Puzzles as JSONL rows {"target", "nums", "solution"}, the shape load_puzzles reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for p in puzzles:
            f.write(json.dumps({"target": p.target, "nums": list(p.nums), "solution": p.solution}) + "\n")


def save_splits(out_dir: str | os.PathLike, splits: dict[str, list[Puzzle]]) -> None:
    """Each split as <out_dir>/<name>.jsonl (save_puzzles' rows), written whole: every file is written under a
    temporary name first and replaces its target only once all are written, so a failure leaves the previous
    files as they were (never a new train.jsonl beside an old test.jsonl). ValueError for a target that is a
    directory; OSError for a failed write."""
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in splits}
    for path in paths.values():
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory")
    written = {}
    try:
        for name, puzzles in splits.items():
            written[name] = paths[name] + f".{os.getpid()}.tmp"
            save_puzzles(written[name], puzzles)
        for name, tmp in written.items():
            os.replace(tmp, paths[name])
    finally:
        for tmp in written.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def _jsonl_rows(path: str, start: int, stop: int | None) -> Iterator[tuple[str, Any]]:
    """(where, parsed row) for rows [start, stop); blank lines are not rows. Parses only those rows."""
    selected = []
    row = -1
    with open(path, "rb") as f:  # bytes: a bad byte is an error of its line, found only if the line is read
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row += 1
            if stop is not None and row >= stop:
                break
            if row >= start:
                selected.append((line_number, line))
    _check_range(path, start, stop, row + 1)
    for line_number, line in selected:
        where = f"line {line_number}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, {where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, {where}: not valid JSON ({e.msg})") from None
        except ValueError:  # valid JSON, but an integer past Python's int-from-string limit
            digits = sys.get_int_max_str_digits()
            raise ValueError(f"{path}, {where}: an integer of more than {digits} digits") from None


def _parquet_rows(path: str, start: int, stop: int | None) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow; run pip install -e '.[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    missing = {"target", "nums"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: expected columns 'target' and 'nums', missing {sorted(missing)}")
    _check_range(path, start, stop, table.num_rows)
    end = table.num_rows if stop is None else stop
    for offset, row in enumerate(table.slice(start, end - start).to_pylist()):
        yield f"row {start + offset}", row


def _check_range(path: str, start: int, stop: int | None, num_rows: int) -> None:
    if start > num_rows or (stop is not None and stop > num_rows):
        raise ValueError(f"{path} has {num_rows} rows; rows [{start}, {stop}) were asked for")


def _puzzle(row: Any, path: str, where: str) -> Puzzle:
    """Validate one row: {"target": int, "nums": [int, ...], optional "solution": str}."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}, {where}: {what}")

    if not isinstance(row, dict):
        raise bad(f"expected an object with 'target' and 'nums', got {type(row).__name__}")
    if "target" not in row or "nums" not in row:
        raise bad(f"expected keys 'target' and 'nums', got {sorted(row)}")
    target, nums, solution = row["target"], row["nums"], row.get("solution") or ""
    if not _is_int(target):
        raise bad(f"'target' must be an integer, got {target!r}")
    # The reward finds numbers as digit runs, so a negative number could never count as used.
    if not isinstance(nums, list | tuple) or not nums or not all(_is_int(n) and n >= 0 for n in nums):
        raise bad(f"'nums' must be a non-empty list of non-negative integers, got {nums!r}")
    if not isinstance(solution, str):
        raise bad(f"'solution' must be a string, got {solution!r}")
    return Puzzle(nums=tuple(int(n) for n in nums), target=int(target), solution=solution)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a number
