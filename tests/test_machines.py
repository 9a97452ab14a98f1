"""Machine presets (grpo/presets.py): Gemma 2 2B's GRPO step compiled for every free accelerator at the machine's
checked batch shape fits its memory (each distinct program compiled once), explicit flags win, the checked
plan (the fallback without memory analysis) micro-batches bigger recipes down to the checked per-device shape,
and bad machines / impossible fits are one-line exit-2 errors before any weights load.

Reference: XLA's memory analysis of the compiled step (abstract shapes, fake CPU devices) against
FIT_FRACTION x the machine's memory per device; the rollout's analytic upper bound against the same bar.
"""

from __future__ import annotations

import json

import pytest
from binaries import ROOT, run_tool

from grpo import planner, presets

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"


def _inspect_json(*args: str) -> dict:
    out = run_tool("inspect", "--what", "step", "--preset", "gemma2-2b", "--json", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _distinct_programs() -> list[str]:
    """One machine per distinct checked program (v5e-8 and v3-8 compile the same one)."""
    seen = {}
    for name in presets.ACCELERATORS:
        m = presets.MACHINES[name]
        seen.setdefault((m.devices, m.device_gib, m.mesh, m.dtype, m.num_micro_batches, m.remat, m.lora_rank, m.rows,
                         m.seq_len, m.rollout_rows), name)
    return list(seen.values())


def test_machines_sharing_a_program_are_the_same_check():
    assert "kaggle-tpu-v3-8" not in _distinct_programs() and "kaggle-tpu-v5e-8" in _distinct_programs()
    assert len(_distinct_programs()) == len(presets.ACCELERATORS) - 1


@pytest.mark.parametrize("name", _distinct_programs())
def test_gemma2_2b_step_fits_every_accelerator_machine(name):
    m = presets.MACHINES[name]
    n = _inspect_json("--machine", name)
    assert (n["batch"], n["seq_len"], n["num_micro_batches"], n["remat"]) == (m.rows, m.seq_len,
                                                                               m.num_micro_batches, m.remat)
    assert n["lora_rank"] == m.lora_rank and n["devices"] == m.devices
    assert n["device_bytes"] == m.device_bytes()
    bar = m.budget_bytes()  # FIT_FRACTION of what JAX may use (a GPU: GPU_MEM_FRACTION of the card)
    assert 0 < n["peak_bytes_per_device"] <= bar, (name, n["peak_bytes_per_device"] / 2**30)
    assert 0 < n["rollout_bytes_per_device"] <= bar, (name, n["rollout_bytes_per_device"] / 2**30)
    assert n["fits"] is True
    # the report's lines add up (bf16 storage corrected the peak but not the arguments it is the sum of)
    assert n["argument_bytes"] + n["output_bytes"] - n["alias_bytes"] + n["temp_bytes"] == n["peak_bytes_per_device"]


def test_the_check_can_fail_and_explicit_flags_win():
    # Full fine-tuning of 2B on one 16 GiB chip: 42 GB of float32 state cannot fit, and the check says so.
    n = _inspect_json("--machine", "colab-tpu-v5e-1", "--lora_rank", "0", "--batch", "4", "--num_micro_batches", "1")
    assert (n["lora_rank"], n["batch"], n["num_micro_batches"]) == (0, 4, 1)
    assert n["peak_bytes_per_device"] > presets.FIT_FRACTION * n["device_bytes"]
    assert n["step_fits"] is False and n["fits"] is False


def test_a_recipe_batch_is_micro_batched_down_to_the_checked_shape():
    m = presets.MACHINES["kaggle-tpu-v5e-8"]
    limit = planner.per_device_tokens(m)
    rows, seq = 128 * 5, presets.PROMPT_TOKENS + 1024  # --recipe tinyzero
    mb = planner.plan_micro_batches(m, rows, seq, 8, None)
    assert rows % (8 * mb) == 0 and rows * seq / (mb * 8) <= limit
    assert planner.plan_micro_batches(m, rows, seq, 8, None) >= m.num_micro_batches
    assert planner.plan_rollout_rows(m, rows, seq, None) * seq <= m.rollout_rows * m.seq_len
    # the checked shape itself needs nothing more
    assert planner.plan_micro_batches(m, m.rows, m.seq_len, 8, None) == m.num_micro_batches
    with pytest.raises(ValueError, match="^--num_micro_batches"):
        planner.plan_micro_batches(m, rows, seq, 8, 1)
    with pytest.raises(ValueError, match="^--prompts_per_step"):
        planner.plan_micro_batches(m, 12, seq, 8, None)  # 12 rows never split over 8 devices


def _one_line(result, flag: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"--{flag}" in lines[0], lines
    return lines[0]


def test_bin_inspect_bad_machine_input():
    _one_line(run_tool("inspect", "--what", "step", "--machine", "tpu-v9"), "machine")
    _one_line(run_tool("inspect", "--what", "step", "--machine", "kaggle-tpu-v5e-8", "--mesh", "data=1,fsdp=4"),
              "mesh")
    _one_line(run_tool("inspect", "--what", "forward", "--machine", "gpu-80g"), "machine")


def test_bin_train_device_count_must_match(tmp_path):
    out = tmp_path / "run"
    line = _one_line(run_tool("train", f"--model_dir={TINY}", f"--output_dir={out}", "--machine=kaggle-tpu-v5e-8"),
                     "machine")
    assert "8 devices" in line
    assert not out.exists()


def test_bin_train_machine_of_another_platform(tmp_path):
    """gpu-80g's one device matches this CPU's count, but its budget is a GPU's memory: refused before the plan."""
    from tiny_model import make_tiny_model_dir

    out = tmp_path / "run"
    line = _one_line(run_tool("train", f"--model_dir={make_tiny_model_dir(tmp_path / 'model')}", f"--output_dir={out}",
                              "--machine=gpu-80g"), "machine")
    assert "is a gpu machine but JAX runs on cpu" in line and not out.exists()


def test_bin_train_full_fine_tuning_that_cannot_fit_names_the_flag(tmp_path):
    """Full fine-tuning of Gemma 2 2B on one 16 GiB chip: only its config is needed, the check runs before any
    weight loads. (A plan that cannot fit even one row: tests/test_planner.py.)"""
    from model.config import get_preset, save_config

    out = tmp_path / "run"
    model_dir = tmp_path / "gemma2-2b"
    model_dir.mkdir()
    save_config(model_dir, get_preset("gemma2-2b"))
    _one_line(run_tool("train", f"--model_dir={model_dir}", f"--output_dir={out}", "--machine=colab-tpu-v5e-1",
                       "--lora_rank=0"), "lora_rank")
    assert not out.exists()


def test_bin_train_machine_auto_on_cpu_prints_its_plan_and_runs(tmp_path):
    """--machine auto on this CPU is the cpu machine: its hardware choices reach the run (float32, remat, LoRA rank
    16 as bin/train's default: full fine-tuning before, which doubled a laptop's step time and memory), the plan
    comes from the tiny model's compiled programs against this machine's RAM (one micro-batch, all 64 rows in one
    sampler call), and the run finishes."""
    from tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    result = run_tool("train", f"--model_dir={model_dir}", f"--output_dir={out}", "--machine=auto", "--steps=1",
                      "--prompts_per_step=8", "--eval_size=1", "--num_train_puzzles=40", "--max_new_tokens=64",
                      "--noexport_hf", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "machine cpu (CPU (this machine's RAM; float32)): mesh fsdp over all devices, dtype float32, " \
           "remat=True, lora_rank 16; plan: 1 micro-batches" in result.stdout
    assert "64 rows per sampler call" in result.stdout and "from memory analysis" in result.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["lora"]["rank"] == 16 and config["grpo"]["num_micro_batches"] == 1 and config["grpo"]["remat"]
    assert config["rollout"]["batch_rows"] == 64
