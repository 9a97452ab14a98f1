"""Benchmark binaries' contracts (not their speed: targets live in BUILD.md, never in timed tests).

Reference: the documented output format (`bin/bench_train --json`: {"tails": {"completion": {"step_s": ...}}}
on the last line) and the one-line refusal of a shape that cannot fit, decided from XLA's memory analysis of
the abstractly compiled step before any weight is allocated.
"""

from __future__ import annotations

import json
import statistics

import pytest
from binaries import run_tool


def test_bench_train_json_has_step_seconds_per_tail():
    out = run_tool("bench_train", "--random", "--preset", "tiny-gemma3", "--rows", "4", "--prompt_len", "8",
                   "--completion_len", "8", "--repeats", "2", "--json", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["tails"]) == {"0", "completion"}
    for timing in result["tails"].values():
        assert len(timing["steps_s"]) == 2 and timing["step_s"] == statistics.median(timing["steps_s"])
        assert abs(timing["tokens_per_s"] - 4 * 16 / timing["step_s"]) < 1e-6 * timing["tokens_per_s"]
    # the all-positions tail unembeds every position, the completion tail only the last 8: never less memory
    assert result["tails"]["0"]["peak_bytes"] >= result["tails"]["completion"]["peak_bytes"]


def test_bench_train_refuses_a_shape_that_cannot_fit_before_allocating():
    out = run_tool("bench_train", "--random", "--rows", "100000", "--tails", "completion", timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error: --rows") and "GiB (XLA's memory analysis)" in lines[0]
    assert "available" in lines[0]


def test_bench_grpo_splits_the_step_into_its_phases(tmp_path):
    """The trainer's phases timed one by one, with --machine auto's plan (this CPU: the tiny model's programs
    against this machine's RAM, so one micro-batch and all 16 rows in one sampler call); an explicit --noremat
    wins over the machine's remat, as every explicit flag does in bin/train."""
    from tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = run_tool("bench_grpo", f"--model_dir={model_dir}", "--max_new_tokens", "8", "--repeats", "2", "--json",
                   "--machine", "auto", "--noremat", env={"AHA_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["prompts"], result["num_generations"], result["beta"]) == (4, 4, 0.04)
    assert (result["machine"], result["num_micro_batches"], result["rollout_batch_size"]) == ("auto", 1, 16)
    assert result["remat"] is False  # the cpu machine's remat is on
    assert "from memory analysis, 2 programs compiled" in out.stdout
    median, steps = result["median"], result["steps"]
    for key in ("rollout_s", "reference_s", "update_s", "total_s"):
        assert median[key] == statistics.median(t[key] for t in steps)
    for t in steps:
        assert t["total_s"] == pytest.approx(t["rollout_s"] + t["reference_s"] + t["update_s"])
        assert 0 < t["completion_tokens"] <= 16 * 8
        assert t["rollout_tokens_per_s"] == pytest.approx(t["completion_tokens"] / t["rollout_s"])
