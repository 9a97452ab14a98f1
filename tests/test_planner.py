"""Plans sized to the model (grpo/planner.py): micro-batches and rows per sampler call from XLA's memory analysis.

References: brute force over every candidate (the search's answer is the first that fits), the compiled peaks
of the tiny model's own programs (budgets set between them), and the issue's acceptance numbers for Gemma 3
270M at TinyZero's shape on an 80 GB GPU (abstract programs compiled on this CPU; no weights).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grpo
import model
from grpo import planner, presets
from grpo.planner import Peak, Programs
from grpo.rollout import RolloutConfig, align_grpo_config
from model.sampling import SamplingConfig


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))


def test_first_fitting_equals_brute_force():
    """Peaks fixed + t0 + t1 / m (temporaries that only partly scale): over 300 random cases, the search returns
    the first candidate whose peak fits, or None when none does, as checking every candidate would."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = planner.micro_batch_counts(int(rng.choice([8, 12, 64, 640])), 1)
        fixed, t0, t1 = rng.uniform(0, 10), rng.uniform(0, 5), rng.uniform(0, 100)
        peak = lambda m: Peak(int(1e9 * fixed), int(1e9 * (t0 + t1 / m)))  # noqa: B023 (called in this loop)
        budget = int(1e9 * rng.uniform(0, 60))
        found = planner.first_fitting(counts, peak, budget, lambda first, m: first / m)
        truth = next(((m, peak(m).total) for m in counts if peak(m).total <= budget), None)
        assert found == truth


def test_a_guess_far_off_costs_log2_compiles_not_one_per_candidate():
    """Temporaries that barely shrink with more micro-batches (40 + 400 / m against a budget of 55): the guess
    from the first compile is far too hopeful; the rest is bisected (it compiled 8 step programs one by one)."""
    counts = planner.micro_batch_counts(640, 1)  # 16 candidates
    compiled = []

    def peak(m):
        compiled.append(m)
        return Peak(10, 40 + 400 // m)

    assert planner.first_fitting(counts, peak, 55, lambda first, m: first / m) == (80, 55)
    assert len(compiled) <= 2 + 4  # the first, the guess, then log2 of the 14 left rounded up


def test_a_program_the_compiler_refuses_for_memory_is_bisected_past():
    """XLA:TPU fails a compile over its HBM (RESOURCE_EXHAUSTED) instead of analysing it: that candidate does not
    fit, and with no sizes to scale the ordered list is bisected (log2 compiles) to the first that does."""
    counts = planner.micro_batch_counts(640, 1)  # 16 candidates
    for first_fit in range(1, len(counts)):
        compiled = []

        def peak(m, compiled=compiled, first_fit=first_fit):
            compiled.append(m)
            return planner.TOO_BIG if counts.index(m) < first_fit else Peak(1, 1)

        assert planner.first_fitting(counts, peak, 10, lambda first, m: first / m) == (counts[first_fit], 2)
        assert len(compiled) <= 1 + 4  # the first, then log2(15) rounded up
    assert planner.first_fitting(counts, lambda m: planner.TOO_BIG, 10, lambda first, m: first / m) is None

    class Refused(Exception):
        pass

    class Lowered:
        def compile(self):
            raise Refused("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")

    assert planner._peak(Lowered()) is planner.TOO_BIG


def test_rollout_rows_whose_kv_cache_scales_are_found():
    """A sampler whose arguments (the KV cache) scale with its rows: at 640 rows it is over the budget, at 80 it
    fits. Scaling only the temporaries, the search ruled every smaller call out without compiling it."""
    programs = Programs(lambda m: Peak(10, 10), lambda r: Peak(r, 1), lambda: 10)
    plan = planner.search(640, 5, 1, 100, programs)
    assert plan.rollout_rows == 80 and plan.rollout_bytes == 10 + 80 + 1


def test_gpu_budgets_are_jax_s_share_of_the_card(monkeypatch):
    """JAX's GPU allocator takes a share of the card (75% by default: the H200's 141 GB read as a 104.9 GiB
    limit; bin/train --machine asks for GPU_MEM_FRACTION): a table GPU's budget is that share; an auto machine
    holds the limit JAX reported, already that share."""
    gpu = presets.MACHINES["gpu-80g"]
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0")  # recorded, so the end of the test restores it
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    assert gpu.budget_bytes() == int(presets.FIT_FRACTION * int(presets.GPU_MEM_FRACTION * gpu.device_bytes()))
    presets.claim_gpu_memory()  # what bin/train does with --machine, unless the user set it
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == str(presets.GPU_MEM_FRACTION)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    presets.claim_gpu_memory()
    assert gpu.usable_bytes() == int(0.75 * gpu.device_bytes())
    tpu = presets.MACHINES["kaggle-tpu-v5e-8"]
    assert tpu.usable_bytes() == tpu.device_bytes()


def test_candidate_lists():
    assert planner.micro_batch_counts(640, 1) == [1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 128, 160, 320, 640]
    assert planner.micro_batch_counts(48, 8) == [1, 2, 3, 6]
    assert planner.micro_batch_counts(12, 8) == []
    assert planner.rollout_row_counts(640, 5) == [640, 320, 160, 80, 40, 20, 10, 5]
    assert planner.rollout_row_counts(48, 8) == [48, 24, 16, 8]  # 6, 3, 2, 1 prompts of 8


def _fake_programs(calls: list) -> Programs:
    """A step whose temporaries halve with each doubling of micro-batches; a sampler linear in its rows."""
    def step(m):
        calls.append(("step", m))
        return Peak(10, 640 // m)

    def sample(r):
        calls.append(("sample", r))
        return Peak(5, r)

    return Programs(step, sample, lambda: 10)


def test_search_plan_shrinks_with_the_budget_and_keeps_given_values():
    budgets = [700, 330, 170, 100, 50]
    plans = [planner.search(640, 5, 1, b, _fake_programs([])) for b in budgets]
    micro = [p.num_micro_batches for p in plans]
    rows = [p.rollout_rows for p in plans]
    assert micro == [1, 2, 4, 8, 16] and rows == [640, 160, 80, 80, 20]  # 10 + 640 / m and 15 + r
    assert all(p.step_bytes <= b and p.rollout_bytes <= b for p, b in zip(plans, budgets, strict=True))
    kept = planner.search(640, 5, 1, 700, _fake_programs([]), {"num_micro_batches": 4, "rollout_batch_size": 40})
    assert (kept.num_micro_batches, kept.rollout_rows) == (4, 40)
    with pytest.raises(ValueError, match="^--num_micro_batches: with 1 micro-batches"):
        planner.search(640, 5, 1, 300, _fake_programs([]), {"num_micro_batches": 1})
    with pytest.raises(ValueError, match="^--num_micro_batches: 3 does not divide"):
        planner.search(640, 5, 1, 300, _fake_programs([]), {"num_micro_batches": 3})
    with pytest.raises(ValueError, match="^--rollout_batch_size: 640 rows"):
        planner.search(640, 5, 1, 300, _fake_programs([]), {"rollout_batch_size": 640})


def test_a_plan_that_cannot_fit_names_the_flag_to_change():
    with pytest.raises(ValueError, match="^--prompts_per_step: even one row per micro-batch"):
        planner.search(640, 5, 1, 10, _fake_programs([]))  # 10 + 640 / 640 > 10
    tight = Programs(lambda m: Peak(1, 1), lambda r: Peak(100, r), lambda: 0)
    with pytest.raises(ValueError, match="^--num_generations: one prompt's 5 rows"):
        planner.search(640, 5, 1, 50, tight)


def test_a_plan_is_searched_again_when_the_budget_moves(monkeypatch):
    """The cache key holds the budget: a smaller share of the card (XLA_PYTHON_CLIENT_MEM_FRACTION) re-plans
    instead of reusing a plan made for more memory. Reference: the fake programs' peaks against each budget."""
    calls = []
    monkeypatch.setattr(planner, "run_programs", lambda *a, **k: _fake_programs(calls))
    cfg, mesh = model.tiny_config("gemma3", num_layers=2), grpo.make_mesh(data=1, fsdp=1)
    machine = dataclasses.replace(presets.MACHINES["gpu-80g"], device_gib=700 / presets.FIT_FRACTION / 2**30)

    def plan(fraction, given=None):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", str(fraction))
        return planner.plan_run(machine, cfg, grpo.GRPOConfig(num_generations=5), mesh, lora_cfg=None,
                                param_dtype=jnp.float32, rows=640, prompt_len=150, new_tokens=64, stop_states=1,
                                backend="gpu", given=given or {})

    roomy, tight = plan(1.0), plan(0.25)
    assert tight.compiles > 0 and tight.budget_bytes < roomy.budget_bytes
    assert roomy.step_bytes <= roomy.budget_bytes and tight.step_bytes <= tight.budget_bytes
    assert tight.num_micro_batches > roomy.num_micro_batches
    # --rollout_batch_size as the rollout runs it: 0 is every row in one call, 7 rows are one group of 5
    assert plan(1.0, {"rollout_batch_size": 0}).rollout_rows == 640
    assert plan(1.0, {"rollout_batch_size": 7}).rollout_rows == 5
    assert plan(1.0, {"rollout_batch_size": 5000}).rollout_rows == 640  # never more than the batch


def test_a_plan_is_cached_per_shape():
    calls = []
    key = {"model": "m", "rows": 640}
    first = planner.cached_search(key, lambda: planner.search(640, 5, 1, 170, _fake_programs(calls)))
    assert first.compiles == len(calls) > 0
    again = planner.cached_search(key, lambda: planner.search(640, 5, 1, 170, _fake_programs(calls)))
    assert dataclasses.replace(again, compiles=first.compiles) == first and again.compiles == 0
    assert len(calls) == first.compiles  # nothing compiled the second time
    other = planner.cached_search({**key, "rows": 320}, lambda: planner.search(320, 5, 1, 170, _fake_programs(calls)))
    assert other.compiles > 0  # another shape is searched


class _Device:
    def __init__(self, platform, limit=None, kind="NVIDIA H200"):
        self.platform, self.device_kind, self._limit = platform, kind, limit

    def memory_stats(self):
        if self._limit == "raises":  # a PJRT plugin without the call
            raise RuntimeError("UNIMPLEMENTED: memory_stats")
        return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_auto_machine_reads_jax():
    h200 = planner.auto_machine([_Device("gpu", int(139.8 * 2**30))])
    assert (h200.name, h200.platform, h200.devices, h200.mesh) == ("auto", "gpu", 1, "data=1,fsdp=1")
    assert h200.budget_bytes() == int(presets.FIT_FRACTION * int(139.8 * 2**30))
    a100_40 = planner.auto_machine([_Device("gpu", 40 * 2**30)] * 2)
    assert a100_40.devices == 2 and a100_40.device_gib == 40 and a100_40.mesh == "data=1,fsdp=2"
    assert planner.auto_machine(jax.devices()) is presets.MACHINES["cpu"]  # this CPU
    for limit in (None, "raises"):
        with pytest.raises(ValueError, match="^--machine: auto cannot read the memory"):
            planner.auto_machine([_Device("tpu", limit, "TPU v9")])
    # a 16 GiB TPU core reports a little less: its table machine's choices, not an 8 GiB one's (bf16, LoRA 16);
    # an 80 GB card's JAX limit (its GPU_MEM_FRACTION) is the 80 GB machine's, not a T4's
    v5e = planner.auto_machine([_Device("tpu", int(15.75 * 2**30))] * 8)
    assert v5e.device_gib == 15.75 and (v5e.dtype, v5e.lora_rank) == (presets.MACHINES["kaggle-tpu-v5e-8"].dtype,
                                                                       presets.MACHINES["kaggle-tpu-v5e-8"].lora_rank)
    h100 = planner.auto_machine([_Device("gpu", int(presets.GPU_MEM_FRACTION * 79.6 * 2**30))])
    assert h100.lora_rank == presets.MACHINES["gpu-80g"].lora_rank == 0


def test_without_memory_analysis_the_checked_plan_is_used(monkeypatch):
    monkeypatch.setattr(planner, "run_programs", lambda *a, **k: Programs(lambda m: None, lambda r: None, lambda: 0))
    machine = presets.MACHINES["kaggle-tpu-v5e-8"]
    cfg = model.tiny_config("gemma3", num_layers=2)
    plan = planner.plan_run(machine, cfg, grpo.GRPOConfig(num_generations=5), grpo.make_mesh(data=1, fsdp=1),
                            lora_cfg=None, param_dtype=jnp.float32, rows=640, prompt_len=150, new_tokens=1024,
                            stop_states=1, backend="cpu", given={})
    assert plan.how.startswith("kaggle-tpu-v5e-8's checked plan")
    seq = 160 + 1024
    assert plan.num_micro_batches == planner.plan_micro_batches(machine, 640, seq, 1, None)


@pytest.fixture(scope="module")
def tiny_programs():
    """The tiny model's real step and sampler programs (32 rows, G = 4, 20 + 32 tokens), each compiled once."""
    import functools

    cfg = model.tiny_config("gemma3", num_layers=2)
    gcfg = align_grpo_config(grpo.GRPOConfig(num_generations=4, remat=True, shared_prompt=True),
                             RolloutConfig(max_new_tokens=32, sampling=SamplingConfig(1.0)))
    p = planner.run_programs(cfg, gcfg, grpo.make_mesh(data=1, fsdp=1), lora_cfg=None, param_dtype=jnp.float32,
                             rows=32, seq_len=20 + 32, prompt_len=20, new_tokens=32, stop_states=1, on_target=True)
    return Programs(functools.cache(p.step_peak), functools.cache(p.sample_peak), functools.cache(p.stored_bytes))


def test_tiny_model_plan_follows_its_compiled_peaks(tiny_programs):
    """The tiny model's real programs: with the budget at the peak of the 1-micro-batch step it takes 1; one
    byte less and it takes more micro-batches, each step peak within its budget; its sampler's rows likewise."""
    roomy = planner.search(32, 4, 1, 2**30, tiny_programs)
    assert (roomy.num_micro_batches, roomy.rollout_rows) == (1, 32)
    need = max(roomy.step_bytes, roomy.rollout_bytes)
    assert planner.search(32, 4, 1, need, tiny_programs).num_micro_batches == 1
    tighter = planner.search(32, 4, 1, roomy.step_bytes - 1, tiny_programs)
    assert tighter.num_micro_batches > 1 and tighter.step_bytes < roomy.step_bytes
    smaller = planner.search(32, 4, 1, roomy.rollout_bytes - 1, tiny_programs)
    assert smaller.rollout_rows < 32 and smaller.rollout_bytes < roomy.rollout_bytes


def test_270m_at_tinyzero_shape_on_an_80g_gpu():
    """Issue acceptance: Gemma 3 270M, 128 prompts x 5, 1,024 new tokens, full fine-tuning, remat, bf16 compute
    planned for gpu-80g (compiled on this CPU with float32 compute: an upper bound): <= 8 micro-batches (the
    table's plan was Gemma 2 2B's 160) and >= 320 rows per sampler call (it was 64); within budget."""
    cfg = model.get_preset("gemma3-270m")
    machine = presets.MACHINES["gpu-80g"]
    gcfg = grpo.GRPOConfig(num_generations=5, beta=0.001, entropy_coef=0.001, remat=True, compute_dtype="bfloat16",
                           shared_prompt=True)
    gcfg = align_grpo_config(gcfg, RolloutConfig(max_new_tokens=1024, sampling=SamplingConfig(1.0)))
    plan = planner.plan_run(machine, cfg, gcfg, grpo.make_mesh(data=1, fsdp=1), lora_cfg=None,
                            param_dtype=jnp.float32, rows=640, prompt_len=150, new_tokens=1024, stop_states=1,
                            backend="cpu", given={})
    assert plan.how == "memory analysis", plan
    assert plan.num_micro_batches <= 8 and plan.rollout_rows >= 320, plan.describe()
    assert plan.step_bytes <= plan.budget_bytes and plan.rollout_bytes <= plan.budget_bytes
    assert plan.compiles <= 5


def test_out_of_memory_advice():
    cpu = RuntimeError("INTERNAL: Out of memory allocating 3221225472 bytes.")
    line = planner.out_of_memory_advice(cpu, planned=False)
    assert line.startswith("out of memory (3.0 GiB in one buffer): use --machine auto")
    assert "\n" not in line and "re-run the same command" in line
    gpu = planner.out_of_memory_advice(RuntimeError("RESOURCE_EXHAUSTED: while allocating"), planned=True)
    assert gpu.startswith("out of memory: use --remat") and "--machine" not in gpu  # planned: the plan is not the fix
    assert planner.out_of_memory_advice(ValueError("shapes differ"), planned=False) is None
