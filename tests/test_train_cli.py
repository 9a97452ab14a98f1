"""bin/train's bad-input errors: one line naming the flag, exit code 2, before anything compiles.

Reference: the flag names in the message; each case must fail in setup (well under the time any compile takes).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"


def _train(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, str(ROOT / "bin" / "train"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _error_line(out):
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def test_missing_checkpoint(tmp_path):
    assert "--model_dir: checkpoint directory not found" in _error_line(_train("--model_dir", str(tmp_path / "x")))


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
