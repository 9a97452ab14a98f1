"""Every flag of bin/train (and the shared flags of the other binaries) fed a bad value: exit status 2, ONE line
on stderr that names the flag, no traceback, and nothing written to --output_dir.

Reference: the table below, which must cover every flag bin/train defines (a new flag without a row fails
`test_the_table_covers_every_flag`). Timing is not asserted; every case fails in setup, before a compile.
bin/train's table runs in this process (`bin.train.run(argv)` under absl's flagsaver, exit status and stderr as a user
sees them); a few cases run it as a new interpreter too, and the other binaries run as processes forked from
the tests' tool server (tests/binaries.py: `python -m bin.<name>` without importing jax each time).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from binaries import ROOT, run_tool, train_in_process

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"  # a checkpoint without tokenizer.model: later checks never run

# flag -> bad value. "{tmp}" becomes the test's temporary directory; the files it names are made in `_files`.
TRAIN_BAD = {
    "model_dir": "{tmp}/missing_model", "checkpoint": "{tmp}/missing_model", "tokenizer": "{tmp}/not_sp.model",
    "dtype": "float16", "data_file": "{tmp}/bad.jsonl", "num_train_puzzles": "0", "template": "llama",
    "output_dir": "{tmp}/a_file/run", "steps": "-1", "prompts_per_step": "0", "eval_every": "-1", "eval_size": "-2",
    "checkpoint_every": "0", "keep_checkpoints": "0", "seed": "-3", "resume": "maybe", "profile_steps": "2",
    "max_bad_steps": "0", "export_hf": "perhaps", "log_to": "mlflow", "num_generations": "1",
    "learning_rate": "-1", "beta": "-0.5", "entropy_coef": "-1", "epsilon_low": "-0.1", "epsilon_high": "-0.2",
    "loss_type": "mean",
    "scale_rewards": "std", "mask_truncated_completions": "sometimes", "num_iterations": "0",
    "num_micro_batches": "0", "warmup_steps": "-5", "lr_schedule": "linear", "weight_decay": "-0.01",
    "max_grad_norm": "0", "remat": "yes please", "max_new_tokens": "100000", "temperature": "-2", "top_k": "0",
    "top_p": "1.5", "mesh": "data=3", "coordinator_address": "localhost", "num_processes": "2", "process_id": "0",
    "recipe": "fast", "curriculum": "steep", "promote_at": "1.5", "stop_at_answer": "maybe",
    "skip_zero_std_groups": "often", "shared_prompt": "sometimes", "time_limit": "soon", "lora_rank": "-1",
    "lora_alpha": "-2",
    "lora_targets": "q,attn", "machine": "tpu-v9", "rollout_batch_size": "-1",
    "shaping": "gentle", "start_level": "5x1-999", "level_mix": "kinda", "level_floor": "1.0",
    "dynamic_sampling": "lots", "max_oversample": "0.5", "adaptive_entropy": "auto", "target_entropy": "0",
    "guard": "sometimes", "guard_warmup_steps": "-1", "guard_patience": "0", "guard_action": "panic",
    "max_rollbacks": "-1", "min_think_tokens": "-1", "max_think_tokens": "65", "wait_text": "",
}
# Flags whose bad value only shows once an earlier check passes: they need a real model + tokenizer.
NEEDS_MODEL = {"data_file", "max_new_tokens", "output_dir", "curriculum"}
# The flag the message must name (an alias reports its target).
NAMED = {"checkpoint": "model_dir"}


def _files(tmp: Path) -> None:
    (tmp / "not_sp.model").write_text("a plain text file, not a SentencePiece model\n")
    (tmp / "bad.jsonl").write_text('{"target": 10, "nums": [1, 2, 3]}\n{"target": oops}\n')
    (tmp / "a_file").write_text("a file where a directory is expected\n")


def _assert_one_line_error(result, flag: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (flag, result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (flag, result.stderr[-2000:])
    assert re.search(rf"--{flag}\b", lines[0]), (flag, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def real_model_dir():
    pytest.importorskip("gguf", reason="needs the gguf extra (CI installs it)")
    from model.default_model import default_model_dir

    return default_model_dir()


# Cases also run as `python -m bin.train` in a new interpreter: a failure at absl's parsing, one in setup, one needing
# the model, one in the multi-host checks.
SUBPROCESS_CASES = ("steps", "machine", "data_file", "process_id")


def _train_args(flag: str, tmp_path: Path, request) -> tuple[list[str], Path]:
    _files(tmp_path)
    value = TRAIN_BAD[flag].format(tmp=tmp_path)
    model_dir = request.getfixturevalue("real_model_dir") if flag in NEEDS_MODEL else TINY
    out = tmp_path / "run"
    args = [f"--model_dir={model_dir}", f"--output_dir={out}"]
    if flag == "num_processes":
        args.append("--process_id=0")  # --num_processes without --coordinator_address
    if flag == "lora_alpha":
        args.append("--lora_rank=4")  # alpha is only checked when there are adapters
    if flag == "process_id":
        args += ["--coordinator_address=localhost:1234", "--num_processes=1", "--process_id=1"]
    else:
        args.append(f"--{flag}={value}")
    return args, out


@pytest.mark.parametrize("flag", sorted(TRAIN_BAD))
def test_bin_train_bad_value(flag, tmp_path, request, capsys):
    args, out = _train_args(flag, tmp_path, request)
    _assert_one_line_error(train_in_process(args, capsys), NAMED.get(flag, flag))
    if flag != "output_dir":
        assert not out.exists(), f"--{flag}: the run directory was created before the error"


@pytest.mark.parametrize("flag", SUBPROCESS_CASES)
def test_bin_train_bad_value_as_a_subprocess(flag, tmp_path, request):
    args, out = _train_args(flag, tmp_path, request)
    _assert_one_line_error(run_tool("train", *args, timeout=300, fork=False), NAMED.get(flag, flag))
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [
    ("learning_rate", "nan"), ("beta", "nan"), ("epsilon_high", "nan"), ("weight_decay", "inf"),
    ("max_grad_norm", "nan"), ("temperature", "nan"), ("max_oversample", "inf"), ("target_entropy", "inf"),
    ("lora_alpha", "nan"),
])
def test_nan_and_inf_are_bad_values(flag, value, tmp_path, capsys):
    """NaN passed every `< 0` check: the run went on and skipped every step as non-finite (an infinite
    --max_oversample ended in an OverflowError after the compiles)."""
    args = [f"--model_dir={TINY}", f"--output_dir={tmp_path / 'run'}", f"--{flag}={value}", "--lora_rank=4"]
    _assert_one_line_error(train_in_process(args, capsys), flag)


def test_empty_lora_targets_is_an_error(tmp_path, capsys):
    # an empty list used to mean the default (every projection) instead of what was typed
    args = [f"--model_dir={TINY}", f"--output_dir={tmp_path / 'run'}", "--lora_rank=4", "--lora_targets="]
    assert "is empty" in _assert_one_line_error(train_in_process(args, capsys), "lora_targets")


def test_dr_grpo_gets_past_the_configs(tmp_path, capsys):
    # --loss_type dr_grpo was refused for a max_completion_length no flag sets (it is --max_new_tokens); with a
    # checkpoint that has no tokenizer the first error is now the tokenizer's, after the configs
    args = [f"--model_dir={TINY}", f"--output_dir={tmp_path / 'run'}", "--loss_type=dr_grpo"]
    _assert_one_line_error(train_in_process(args, capsys), "tokenizer")


def test_the_table_covers_every_flag():
    helpfull = run_tool("train", "--helpfull").stdout
    defined, section = set(), None
    for line in helpfull.splitlines():
        if line and not line.startswith(" "):
            section = line
        elif section and ("bin/train.py" in section or "bin.cli" in section) and line.startswith("  --"):
            defined.add(re.match(r"  --(?:\[no\])?(\w+)", line).group(1))
    assert defined and defined <= set(TRAIN_BAD), sorted(defined - set(TRAIN_BAD))


@pytest.mark.parametrize("tool,flag,value", [
    ("sample", "model_dir", "/nonexistent/model"), ("sample", "checkpoint", "/nonexistent/model"),
    ("sample", "dtype", "int8"), ("sample", "temperature", "-1"), ("sample", "top_p", "2"),
    ("sample", "temperature", "1e-40"),  # logits / T overflowed: NaN log-probs, every token pad
    ("inspect", "mesh", "data=x"), ("inspect", "dtype", "fp8"), ("inspect", "batch", "0"),
    ("inspect", "logprob_tail", "1024"), ("inspect", "num_generations", "0"),
    ("bench_train", "profile_dir", "/proc/no_such_dir"),
    ("bench_train", "num_generations", "3"), ("bench_sample", "profile_dir", "/proc/no_such_dir"),
    ("plot", "run_dir", "/nonexistent/run"), ("report", "run_dir", "/nonexistent/run"),
    ("make_dataset", "counts", "3,x"), ("import_gguf", "gguf", "/nonexistent.gguf"),
    ("sample", "wait_text", ""), ("pass_at_k", "min_think_tokens", "9"),  # 9 > --max_think_tokens 8
    ("pass_at_k", "levels", ""),  # an empty list ran every level
    ("pass_at_k", "temperature", "0"),  # with the default --k 8: greedy draws the same completion eight times
    # Each fails before a model loads: below 1 (checked before the thinking budget's comparison with it), a
    # level's puzzle space, a bad config field, an empty list or tail, a prompt past the sampler's context, an
    # unknown preset or platform, an unwritable directory (checked before compiling), the tokenizer of --model_dir.
    ("sample", "max_new_tokens", "-3"), ("sample", "max_new_tokens", "0"), ("pass_at_k", "eval_size", "100000"),
    ("make_dataset", "num_min", "0"), ("make_dataset", "counts", "5"), ("bench_sample", "batch_sizes", ""),
    ("bench_sample", "command_buffer", ""), ("bench_sample", "prompt_len", "40000"), ("bench_train", "tails", "foo"),
    ("bench_train", "tails", ""), ("inspect", "preset", "nope"), ("inspect", "platform", "nope"),
    ("inspect", "dump_hlo", "/proc/no_such_dir"), ("bench_grpo", "model_dir", "tests/fixtures/gemma3_g2"),
])
def test_shared_flags_of_other_binaries(tool, flag, value, tmp_path):
    args = [f"--{flag}={value}"]
    if tool == "sample":
        args.append("--prompt=hello")
    if flag == "min_think_tokens":
        args.append("--max_think_tokens=8")
    if tool in ("make_dataset", "import_gguf"):
        args.append(f"--out={tmp_path / 'out'}")
    _assert_one_line_error(run_tool(tool, *args, timeout=300), NAMED.get(flag, flag))
