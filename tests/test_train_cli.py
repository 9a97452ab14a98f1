"""bin/train's bad-input errors: one line naming the flag, exit code 2, before anything compiles.

Reference: the flag names in the message; each case must fail in setup (well under the time any compile takes).
"""

import pytest
from binaries import ROOT, run_tool

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"


def _train(*args, timeout=120):
    return run_tool("train", *args, timeout=timeout)


def _error_line(out):
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def test_missing_checkpoint(tmp_path):
    assert "--model_dir: checkpoint directory not found" in _error_line(_train("--model_dir", str(tmp_path / "x")))


def test_launcher_path_and_module_agree(tmp_path):
    """`bin/train` (the launcher, from another working directory) and `python -m bin.train` are one program."""
    missing = str(tmp_path / "x")
    via_path = run_tool("train", "--model_dir", missing, launcher=True, timeout=120)
    assert _error_line(via_path) == _error_line(_train("--model_dir", missing))


def test_tokenizer_not_sentencepiece(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a sentencepiece model\n")
    line = _error_line(_train("--model_dir", str(TINY), "--tokenizer", str(bad)))
    assert line.startswith("error: --tokenizer:") and "not a SentencePiece model" in line


@pytest.mark.parametrize("flag,value", [("learning_rate", "-1"), ("beta", "-0.5"), ("warmup_steps", "-5"),
                                        ("temperature", "-2"), ("top_p", "1.5"), ("num_micro_batches", "0")])
def test_bad_knob_names_its_flag(flag, value, tmp_path):
    out = tmp_path / "run"
    line = _error_line(_train("--model_dir", str(TINY), f"--{flag}={value}", f"--output_dir={out}"))
    assert line.startswith(f"error: --{flag}") and not out.exists()


def test_missing_tokenizer():
    assert "--tokenizer: no tokenizer file" in _error_line(_train("--model_dir", str(TINY)))


@pytest.fixture(scope="module")
def real_tokenizer():
    pytest.importorskip("gguf", reason="needs the gguf extra (CI installs it)")
    from model.default_model import default_model_dir

    return default_model_dir() / "tokenizer.model"


def test_tokenizer_vocab_mismatch(real_tokenizer):
    line = _error_line(_train("--model_dir", str(TINY), "--tokenizer", str(real_tokenizer)))
    assert "--tokenizer" in line and "do not match" in line


def test_mesh_that_does_not_divide(real_tokenizer):
    line = _error_line(_train("--model_dir", str(real_tokenizer.parent), "--mesh", "data=3"))
    assert line.startswith("error: --mesh")
    line = _error_line(_train("--model_dir", str(real_tokenizer.parent), "--prompts_per_step", "3",
                              "--num_generations", "3", "--num_micro_batches", "2"))
    assert "--num_micro_batches" in line and "does not divide" in line


def test_malformed_data_file(real_tokenizer, tmp_path):
    bad = tmp_path / "countdown.jsonl"
    bad.write_text('{"target": 10, "nums": [1, 2, 3]}\n{"target": oops}\n')
    line = _error_line(_train("--model_dir", str(real_tokenizer.parent), "--data_file", str(bad)))
    assert line.startswith("error: --data_file:") and "countdown.jsonl" in line
