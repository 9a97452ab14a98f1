"""bin/train's bad-input errors: one line naming the flag, exit code 2, before anything compiles.

Reference: the flag names in the message; each case must fail in setup (well under the time any compile takes).
The error cases run bin/train's main in this process (`binaries.train_in_process`: exit status and stderr as a
user sees them); the launcher's test and the defaults' end-to-end run are subprocesses, as users start them.
"""

import pytest
from binaries import ROOT, run_tool, train_in_process

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"


def _train(*args, timeout=120):
    return run_tool("train", *args, timeout=timeout)


@pytest.fixture
def train(capsys):
    return lambda *args: train_in_process(list(args), capsys)


def _error_line(out):
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def test_missing_checkpoint(train, tmp_path):
    assert "--model_dir: checkpoint directory not found" in _error_line(train("--model_dir", str(tmp_path / "x")))


def test_launcher_path_and_module_agree(tmp_path):
    """`bin/train` (the launcher, from another working directory) and `python -m bin.train` are one program."""
    missing = str(tmp_path / "x")
    via_path = run_tool("train", "--model_dir", missing, launcher=True, timeout=120, cwd=tmp_path)
    assert _error_line(via_path) == _error_line(_train("--model_dir", missing))
    # from inside bin/, whose inspect.py would shadow the standard library's inspect on a `python -m` path
    inside = run_tool("train", "--model_dir", missing, launcher=True, timeout=120, cwd=ROOT / "bin")
    assert _error_line(inside) == _error_line(via_path)


def test_tokenizer_not_sentencepiece(train, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a sentencepiece model\n")
    line = _error_line(train("--model_dir", str(TINY), "--tokenizer", str(bad)))
    assert line.startswith("error: --tokenizer:") and "not a SentencePiece model" in line


@pytest.mark.parametrize("flag,value", [("learning_rate", "-1"), ("beta", "-0.5"), ("warmup_steps", "-5"),
                                        ("temperature", "-2"), ("top_p", "1.5"), ("num_micro_batches", "0")])
def test_bad_knob_names_its_flag(train, flag, value, tmp_path):
    out = tmp_path / "run"
    line = _error_line(train("--model_dir", str(TINY), f"--{flag}={value}", f"--output_dir={out}"))
    assert line.startswith(f"error: --{flag}") and not out.exists()


def test_missing_tokenizer(train):
    assert "--tokenizer: no tokenizer file" in _error_line(train("--model_dir", str(TINY)))


@pytest.fixture(scope="module")
def real_tokenizer():
    pytest.importorskip("gguf", reason="needs the gguf extra (CI installs it)")
    from model.default_model import default_model_dir

    return default_model_dir() / "tokenizer.model"


def test_tokenizer_vocab_mismatch(train, real_tokenizer):
    line = _error_line(train("--model_dir", str(TINY), "--tokenizer", str(real_tokenizer)))
    assert "--tokenizer" in line and "do not match" in line


def test_mesh_that_does_not_divide(train, real_tokenizer, tmp_path):
    out = tmp_path / "run"
    line = _error_line(train("--model_dir", str(real_tokenizer.parent), "--mesh", "data=3", f"--output_dir={out}"))
    assert line.startswith("error: --mesh")
    line = _error_line(train("--model_dir", str(real_tokenizer.parent), "--prompts_per_step", "3",
                              "--num_generations", "3", "--num_micro_batches", "2", f"--output_dir={out}"))
    assert "--num_micro_batches" in line and "does not divide" in line and not out.exists()


def test_malformed_data_file(train, real_tokenizer, tmp_path):
    bad = tmp_path / "countdown.jsonl"
    bad.write_text('{"target": 10, "nums": [1, 2, 3]}\n{"target": oops}\n')
    line = _error_line(train("--model_dir", str(real_tokenizer.parent), "--data_file", str(bad)))
    assert line.startswith("error: --data_file:") and "countdown.jsonl" in line


def test_the_defaults_run_the_ladder_with_lora_end_to_end(tmp_path):
    """README's first command is bin/train with its defaults: the ladder (every level evaluated, the easiest
    trained first), LoRA rank 16 at 10x the full-fine-tuning learning rate, G = 8, 64 new tokens, the zero-std
    filter. Here on a tiny checkpoint, shortened with flags that do not change any of those choices."""
    import json

    from tiny_model import make_tiny_model_dir

    from grpo.config import LORA_LR_SCALE

    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"  # given as ~/run, which the shell leaves alone after `=`: bin/train expands it
    result = run_tool("train", f"--model_dir={model_dir}", "--output_dir=~/run", "--steps=2", "--prompts_per_step=1",
                      "--eval_size=2", "--num_train_puzzles=40", "--max_new_tokens=8", env={"HOME": str(tmp_path)},
                      timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (ROOT / "~").exists() and f"metrics in {out}/metrics.jsonl" in result.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["lora"]["rank"] == 16 and config["grpo"]["learning_rate"] == 1e-5 * LORA_LR_SCALE
    assert config["grpo"]["num_generations"] == 8 and config["rollout"]["skip_zero_std_groups"] is True
    assert config["rollout"]["stop_at_answer"] is True
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["level"] for m in metrics] == ["2x1-9", "2x1-9"]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert list(evals[-1]["solved_by_level"]) == ["2x1-9", "2x1-30", "3x1-30", "3x1-99", "4x1-30", "tinyzero"]
    assert (out / "final_hf" / "config.json").is_file()  # merged export, with its tokenizer: it loads alone
    assert (out / "best_hf" / "config.json").is_file()  # and the best held-out eval's model
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["best_step"] in (0, 2) and len(status["best_score"]) == 7
    assert {"frac_zero_std_solved", "answer_templates", "level_shares", "entropy_coef_applied"} <= metrics[0].keys()
    assert (out / "final_hf" / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    # transformers' AutoTokenizer on the export adds <bos> only when tokenizer_config.json says so (it read the bare
    # tokenizer.model with add_bos_token off); generate stops on our stop ids (the tiny tokenizer's pieces)
    tok_cfg = json.loads((out / "final_hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is True and (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<s>", "</s>")
    gen = json.loads((out / "best_hf" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 4], "pad_token_id": 0}


def test_more_held_out_puzzles_than_a_level_has(train, real_tokenizer):
    """The first rung has a few hundred distinct puzzles: asking for more is a flag error, not a traceback."""
    line = _error_line(train("--model_dir", str(real_tokenizer.parent), "--eval_size", "200"))
    assert line.startswith("error: --eval_size / --num_train_puzzles:") and "distinct" in line


@pytest.mark.parametrize("args,start", [(("--output_dir=",), "error: --output_dir is empty"),
                                        (("--profile_steps=3,1",), "error: --profile_steps: expected A,B with A <= B"),
                                        (("--steps=5", "--profile_steps=0,5"), "error: --profile_steps: expected A,B"),
                                        (("--tokenizer=",), "error: --tokenizer is empty")])
def test_values_that_would_write_elsewhere_or_nothing(train, args, start):
    """An empty --output_dir would train in the working directory; a profile window outside the run's steps
    would trace nothing, silently; an empty --tokenizer meant the default one."""
    assert _error_line(train("--model_dir", str(TINY), *args)).startswith(start)


def test_an_empty_model_dir_is_named(train):
    # it read "no config.json at config.json" (the working directory's)
    assert _error_line(train("--model_dir=", "--output_dir=/tmp/unused")).startswith("error: --model_dir is empty")


def test_a_resume_that_would_change_the_task_or_the_adapters_is_refused(tmp_path):
    """What the last start recorded in run_config.json against this start's flags (grpo/run_files.py), before
    anything compiles: the LoRA layout, and the flags that define the puzzles and held-out sets."""
    import json

    from grpo.run_files import check_resume_layout
    from model.lora import LoraConfig

    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    lora, task = LoraConfig(rank=16, alpha=32.0), {"curriculum": "countdown", "seed": 0, "start_level": None}
    (tmp_path / "run_config.json").write_text(json.dumps({
        "lora": {"rank": 16, "alpha": 32.0, "targets": list(lora.targets)}, "train": {"task_flags": task}}))
    check_resume_layout(str(tmp_path), True, lora, task)  # the same run continues
    check_resume_layout(str(tmp_path), False, None, {**task, "seed": 1})  # --noresume starts over: nothing checked
    for other_lora, other_task, flag in [
        (None, task, "--lora_rank"), (LoraConfig(rank=8, alpha=32.0), task, "--lora_rank"),
        (LoraConfig(rank=16, alpha=7.0), task, "--lora_alpha"), (lora, {**task, "curriculum": "off"}, "--curriculum"),
        (lora, {**task, "start_level": "3x1-30"}, "--start_level"),
    ]:
        with pytest.raises(ValueError, match=f"^{flag}: {tmp_path} holds"):
            check_resume_layout(str(tmp_path), True, other_lora, other_task)
    # killed before its first checkpoint: best/ alone is resumed (its record and scores), so it is checked too
    (tmp_path / "checkpoints" / "2").rmdir()
    (tmp_path / "best" / "0").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"^--seed: {tmp_path} holds"):
        check_resume_layout(str(tmp_path), True, lora, {**task, "seed": 1})
    (tmp_path / "best" / "0").rmdir()
    check_resume_layout(str(tmp_path), True, lora, {**task, "seed": 1})  # nothing saved: nothing to keep


def test_a_second_run_in_a_busy_output_dir_is_refused(train, tmp_path):
    """Two bin/train in one --output_dir: the second repaired the live run's files as if it had died and both wrote
    the same steps. Reference: a process holding the directory's lock (flock on grpo.run_files.LOCK_FILE, as a
    running bin/train does); the second run stops in setup with one line and touches nothing."""
    import shutil
    import subprocess
    import sys

    from tiny_model import make_tiny_model_dir

    from grpo.run_files import LOCK_FILE

    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242 on elsewhere\\n'); f.flush(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _error_line(train("--model_dir", str(model_dir), "--output_dir", str(out), "--steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    assert "--output_dir: another bin/train (pid 4242 on elsewhere) is running in" in line
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    # --noresume would move the run's own export, the model it starts from, into previous_runs/
    shutil.copytree(model_dir, out / "final_hf")
    line = _error_line(train("--model_dir", str(out / "final_hf"), "--output_dir", str(out), "--noresume"))
    assert "--model_dir:" in line and "which --noresume moves into" in line


def test_a_run_holds_its_output_dir_until_it_exits(tmp_path):
    """Reference: another process's non-blocking flock on the lock file, refused while this one holds it; the file
    names this process."""
    import os
    import socket
    import subprocess
    import sys

    from grpo.run_files import LOCK_FILE, claim_run_dir

    claim_run_dir(tmp_path)
    try_lock = ("import fcntl, sys; f = open(sys.argv[1], 'a+')\ntry: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError: print('busy')\nelse: print('free')")
    other = subprocess.run([sys.executable, "-c", try_lock, str(tmp_path / LOCK_FILE)], capture_output=True,
                           text=True, timeout=60)
    assert other.stdout.strip() == "busy", other.stderr
    assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    assert claim_run_dir(tmp_path) == tmp_path.resolve()  # this process again: already its own


def test_help_lists_the_shared_flags():
    """The usage lines name --model_dir; --help (not only --helpfull) must list it and the other shared flags."""
    shown = run_tool("train", "--help").stdout
    assert all(f"  --{name}:" in shown for name in ("model_dir", "tokenizer", "lora_rank", "mesh", "dtype")), shown
    shown = run_tool("sample", "--help").stdout  # every tool's: bin/cli.py's define_* make them its key flags
    assert all(f"  --{name}:" in shown for name in ("model_dir", "tokenizer", "dtype", "wait_text")), shown
