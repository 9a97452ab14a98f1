"""Machine presets (bin/machines.py): Gemma 2 2B's GRPO step compiled for every free accelerator at the machine's
checked batch shape fits its memory, explicit flags win, bigger recipes are micro-batched down to the checked
per-device shape, and bad machines / impossible fits are one-line exit-2 errors before any compile.

Reference: XLA's memory analysis of the compiled step (abstract shapes, fake CPU devices) against
FIT_FRACTION x the machine's memory per device; the rollout's analytic upper bound against the same bar.
"""

from __future__ import annotations

import json

import pytest
from binaries import ROOT, run_tool

from bin import machines

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"


def _inspect_json(*args: str) -> dict:
    out = run_tool("inspect", "--what", "step", "--preset", "gemma2-2b", "--json", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", machines.ACCELERATORS)
def test_gemma2_2b_step_fits_every_accelerator_machine(name):
    m = machines.MACHINES[name]
    n = _inspect_json("--machine", name)
    assert (n["batch"], n["seq_len"], n["num_micro_batches"], n["remat"]) == (m.rows, m.seq_len,
                                                                               m.num_micro_batches, m.remat)
    assert n["lora_rank"] == m.lora_rank and n["devices"] == m.devices
    assert n["device_bytes"] == m.device_bytes()
    bar = machines.FIT_FRACTION * n["device_bytes"]
    assert 0 < n["peak_bytes_per_device"] <= bar, (name, n["peak_bytes_per_device"] / 2**30)
    assert 0 < n["rollout_bytes_per_device"] <= bar, (name, n["rollout_bytes_per_device"] / 2**30)
    assert n["fits"] is True


def test_the_check_can_fail_and_explicit_flags_win():
    # Full fine-tuning of 2B on one 16 GiB chip: 42 GB of float32 state cannot fit, and the check says so.
    n = _inspect_json("--machine", "colab-tpu-v5e-1", "--lora_rank", "0", "--batch", "4", "--num_micro_batches", "1")
    assert (n["lora_rank"], n["batch"], n["num_micro_batches"]) == (0, 4, 1)
    assert n["peak_bytes_per_device"] > machines.FIT_FRACTION * n["device_bytes"]
    assert n["step_fits"] is False and n["fits"] is False


def test_a_recipe_batch_is_micro_batched_down_to_the_checked_shape():
    m = machines.MACHINES["kaggle-tpu-v5e-8"]
    limit = machines.per_device_tokens(m)
    rows, seq = 128 * 5, machines.PROMPT_TOKENS + 1024  # --recipe tinyzero
    mb = machines.plan_micro_batches(m, rows, seq, 8, None)
    assert rows % (8 * mb) == 0 and rows * seq / (mb * 8) <= limit
    assert machines.plan_micro_batches(m, rows, seq, 8, None) >= m.num_micro_batches
    assert machines.plan_rollout_rows(m, rows, seq, None) * seq <= m.rollout_rows * m.seq_len
    # the checked shape itself needs nothing more
    assert machines.plan_micro_batches(m, m.rows, m.seq_len, 8, None) == m.num_micro_batches
    with pytest.raises(machines.FlagError, match="--num_micro_batches"):
        machines.plan_micro_batches(m, rows, seq, 8, 1)
    with pytest.raises(machines.FlagError, match="--prompts_per_step"):
        machines.plan_micro_batches(m, 12, seq, 8, None)  # 12 rows never split over 8 devices


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


def test_bin_train_impossible_fit_names_the_flag(tmp_path):
    # colab-tpu-v5e-1 was checked at 1,280 tokens per micro-batch on its one device ... 16 x 384 in one is more
    out = tmp_path / "run"
    _one_line(run_tool("train", f"--model_dir={TINY}", f"--output_dir={out}", "--machine=colab-tpu-v5e-1",
                       "--num_micro_batches=1"), "num_micro_batches")
    # ... and full fine-tuning of Gemma 2 2B (only its config is needed: the check runs before any weight loads)
    from model.config import get_preset, save_config

    model_dir = tmp_path / "gemma2-2b"
    model_dir.mkdir()
    save_config(model_dir, get_preset("gemma2-2b"))
    _one_line(run_tool("train", f"--model_dir={model_dir}", f"--output_dir={out}", "--machine=colab-tpu-v5e-1",
                       "--lora_rank=0"), "lora_rank")
    assert not out.exists()


def test_bin_train_on_the_cpu_machine_prints_its_plan_and_runs(tmp_path):
    """--machine cpu on a tiny checkpoint: the machine's hardware choices reach the run (float32, 2 micro-batches,
    remat, full fine-tuning, rollout rows), a --recipe-sized batch is micro-batched, and the run finishes."""
    from tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    result = run_tool("train", f"--model_dir={model_dir}", f"--output_dir={out}", "--machine=cpu", "--steps=1",
                      "--prompts_per_step=8", "--eval_size=1", "--num_train_puzzles=40", "--max_new_tokens=64",
                      "--noexport_hf", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # 64 rows x (256 + 64) tokens against the cpu machine's checked 32 x 320 in 2 micro-batches: 4 micro-batches
    assert "machine cpu: mesh fsdp over all devices, dtype float32, 4 micro-batches, remat=True, lora_rank 0, " \
           "32 rollout rows per sampler call" in result.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["lora"] is None and config["grpo"]["num_micro_batches"] == 4 and config["grpo"]["remat"]
    assert config["rollout"]["batch_rows"] == 32
