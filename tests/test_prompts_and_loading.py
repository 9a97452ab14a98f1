"""Tests of the prompt templates, the data loader and bin/make_dataset.

References: TinyZero examples/data_preprocess/countdown.py make_prefix(template_type="base"), written out
by hand below; Gemma's chat-turn markers; the JSONL / Parquet row shape of Countdown-Tasks-3to4.
Exact string and value equality throughout.
"""

import json
import sys
from pathlib import Path

import pytest
from binaries import run_tool

from data.countdown import score
from data.prompts import TEMPLATES, render
from data.puzzles import Puzzle
from data.tinyzero import TINYZERO_TEST, TINYZERO_TRAIN, load_puzzles

REPO = Path(__file__).resolve().parent.parent

TINYZERO_BASE_EXAMPLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: Using the numbers [19, 36, 55, 7], create an equation that equals 65. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And "
    "return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think>"
)


def test_base_template_is_tinyzeros():
    assert render("base", [19, 36, 55, 7], 65) == TINYZERO_BASE_EXAMPLE


def test_chat_template():
    prompt = render("chat", (19, 36, 55, 7), 65)
    question = TINYZERO_BASE_EXAMPLE.split("User: ", 1)[1].split("\nAssistant:", 1)[0]
    assert prompt == (
        f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\nLet me solve this step by step.\n<think>"
    )


def test_render_accepts_numpy_ints_and_prints_a_list():
    import numpy as np

    assert "numbers [1, 2, 3]," in render("base", np.array([1, 2, 3]), np.int64(6))


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match=r"'nope'.*\['base', 'chat'\]"):
        render("nope", [1, 2], 3)
    assert set(TEMPLATES) == {"base", "chat"}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prompt_does_not_change_the_score(template):
    """Scoring prompt + completion equals scoring the completion (TinyZero scores after 'Assistant:')."""
    for completion in (" 1+2+3 = 6 </think>\n<answer>1 + 2 + 3</answer>", " <answer>1 + 2 + 3</answer>", " hm"):
        assert score(render(template, [1, 2, 3], 6) + completion, [1, 2, 3], 6) == score(completion, [1, 2, 3], 6)


# ---- loading ----


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_tinyzero_jsonl(tmp_path):
    f = write_lines(tmp_path / "c.jsonl", [json.dumps({"target": 10 + i, "nums": [i, 2, 3]}) for i in range(5)])
    assert load_puzzles(f) == [Puzzle((i, 2, 3), 10 + i, "") for i in range(5)]
    assert load_puzzles(f, start=1, stop=3) == [Puzzle((1, 2, 3), 11), Puzzle((2, 2, 3), 12)]
    assert load_puzzles(str(f), start=5) == []


def test_load_our_jsonl_with_solutions_and_blank_lines(tmp_path):
    f = write_lines(tmp_path / "ours.jsonl", ['{"target": 6, "nums": [1, 2, 3], "solution": "1 + 2 + 3"}', "", " "])
    assert load_puzzles(f) == [Puzzle((1, 2, 3), 6, "1 + 2 + 3")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"target": 6, "nums": [1, 2, 3]', "line 2: not valid JSON"),
        ('{"nums": [1, 2, 3]}', "line 2: expected keys 'target' and 'nums'"),
        ('{"target": "6", "nums": [1, 2]}', "line 2: 'target' must be an integer"),
        ('{"target": true, "nums": [1, 2]}', "line 2: 'target' must be an integer"),
        ('{"target": 6, "nums": 3}', "line 2: 'nums' must be a non-empty list"),
        ('{"target": 6, "nums": []}', "line 2: 'nums' must be a non-empty list"),
        ('{"target": 6, "nums": [1.5, 2]}', "line 2: 'nums' must be a non-empty list"),
        ('{"target": 6, "nums": [-1, 2]}', "non-negative"),
        ('{"target": 6, "nums": [1, 2], "solution": 7}', "line 2: 'solution' must be a string"),
        ("[6, [1, 2]]", "line 2: expected an object"),
        ('{"target": 6, "nums": [1, ' + "9" * 5000 + "]}", "line 2: an integer of more than 4300 digits"),
    ],
)
def test_malformed_jsonl_rows(tmp_path, line, message):
    f = write_lines(tmp_path / "bad.jsonl", ['{"target": 3, "nums": [1, 2]}', line])
    with pytest.raises(ValueError, match=message) as e:
        load_puzzles(f)
    assert str(f) in str(e.value)


def test_a_bad_byte_names_its_line_and_only_its_line(tmp_path):
    f = tmp_path / "bytes.jsonl"
    f.write_bytes(b'{"target": 3, "nums": [1, 2]}\n{"target": 3, "nums": [1, 2], "solution": "\xe9"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8 text") as e:
        load_puzzles(f)
    assert str(f) in str(e.value)
    assert load_puzzles(f, 0, 1) == [Puzzle((1, 2), 3)]  # rows not asked for are not decoded


def test_row_range_errors(tmp_path):
    f = write_lines(tmp_path / "c.jsonl", ['{"target": 3, "nums": [1, 2]}'] * 3)
    with pytest.raises(ValueError, match="has 3 rows"):
        load_puzzles(f, *TINYZERO_TEST)
    with pytest.raises(ValueError, match="bad row range"):
        load_puzzles(f, start=2, stop=1)
    assert TINYZERO_TRAIN == (0, 327680) and TINYZERO_TEST == (327680, 328704)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Countdown data file"):
        load_puzzles(tmp_path / "absent.jsonl")
    other = tmp_path / "c.csv"
    other.write_text("target,nums\n")
    with pytest.raises(ValueError, match=r"c\.csv: expected a \.jsonl or \.json or \.parquet file"):
        load_puzzles(other)


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"target": [24, 7, 9], "nums": [[4, 6, 1, 3], [3, 4], [2, 3, 4]]}), f)
    assert load_puzzles(f) == [Puzzle((4, 6, 1, 3), 24), Puzzle((3, 4), 7), Puzzle((2, 3, 4), 9)]
    assert load_puzzles(f, 1, 2) == [Puzzle((3, 4), 7)]


def test_malformed_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    wrong_columns = tmp_path / "a.parquet"
    pq.write_table(pa.table({"target": [1], "numbers": [[1]]}), wrong_columns)
    with pytest.raises(ValueError, match=r"a\.parquet: expected columns 'target' and 'nums', missing \['nums'\]"):
        load_puzzles(wrong_columns)
    bad_row = tmp_path / "b.parquet"
    pq.write_table(pa.table({"target": [1, 2], "nums": [[1], None]}), bad_row)
    with pytest.raises(ValueError, match=r"b\.parquet, row 1: 'nums' must be"):
        load_puzzles(bad_row)
    garbage = tmp_path / "c.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"c\.parquet: not a readable Parquet file"):
        load_puzzles(garbage)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    f = tmp_path / "x.parquet"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"pip install -e '\.\[parquet\]'"):
        load_puzzles(f)


def test_make_dataset_writes_loadable_splits(tmp_path):
    """bin/make_dataset end to end: files load back, splits are disjoint, solutions score 1.0."""
    out = tmp_path / "ds"  # given as ~/ds, which the shell leaves alone after `=`: the tool expands it
    args = ["--num_train=30", "--num_test=10", "--seed=3"]
    result = run_tool("make_dataset", *args, "--out=~/ds", env={"HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote 30 train and 10 test puzzles to {out} " in result.stdout and "solution:" in result.stdout
    train, test = load_puzzles(out / "train.jsonl"), load_puzzles(out / "test.jsonl")
    assert len(train) == 30 and len(test) == 10
    assert not {p.key for p in train} & {p.key for p in test}
    assert all(score(f"<answer>{p.solution}</answer>", p.nums, p.target) == 1.0 for p in train + test)
    missing_out = run_tool("make_dataset", *args, timeout=120)
    assert missing_out.returncode == 2 and "--out is required" in missing_out.stderr
