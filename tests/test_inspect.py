"""bin/inspect end to end on tiny presets: it lowers with abstract shapes, fakes its own devices, reports, dumps.

Reference: the model's parameter count (the programs' inputs and donated state are that many float32 / bf16
values, as laid out on the mesh), the report's own lines against its JSON, and the dumped files.
"""

import json
import re
import subprocess

from binaries import run_tool


def _inspect(*args: str, launcher: bool = False) -> subprocess.CompletedProcess:
    # On one CPU device (run_tool's environment): the tool must make its own fake devices for a mesh.
    return run_tool("inspect", *args, launcher=launcher)


def _mib(report: str, name: str) -> float:
    value, unit = re.search(rf"{name}\s+([\d.]+) (GiB|MiB)", report).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def test_forward_on_one_device():
    """The forward's inputs are the float32 params and two [2, 32] int32 arrays (tokens, mask), byte for byte."""
    out = _inspect("--preset", "tiny-gemma2", "--batch", "2", "--seq_len", "32", "--dtype", "float32", "--json",
                   launcher=True)  # the bin/inspect path is a contract too
    assert out.returncode == 0, out.stderr
    assert "what forward: batch 2 x 32 tokens on 1 device(s)" in out.stdout
    n = json.loads(out.stdout.strip().splitlines()[-1])
    assert n["argument_bytes"] == 4 * n["params"] + 2 * (2 * 32 * 4)
    assert abs(_mib(out.stdout, "arguments") - n["argument_bytes"] / 2**20) < 1e-3


def test_step_on_a_fake_mesh_with_hlo_dump(tmp_path):
    out = _inspect("--preset", "tiny-gemma3", "--what", "step", "--batch", "16", "--seq_len", "32",
                   "--mesh", "data=2,fsdp=4", "--num_micro_batches", "2", "--remat", "--beta", "0.04",
                   "--dump_hlo", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert "on 8 device(s) (mesh data=2,fsdp=4), 2 micro-batches, remat=True" in out.stdout
    n = json.loads(out.stdout.strip().splitlines()[-1])
    # donated: float32 params and two Adam moments, split over the 8 devices (the small vectors stay whole)
    full = 3 * 4 * n["params"]
    assert full / 8 <= n["alias_bytes"] <= full / 7, (n["alias_bytes"], full)
    hlo = (tmp_path / "step.optimized.hlo.txt").read_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo  # the collectives the layout promises
    assert "stablehlo" in (tmp_path / "step.stablehlo.mlir").read_text()


def test_lora_step_json_on_one_device():
    """--lora_rank: the LoRA step (adapters + their Adam state donated, base params read-only); --json: the last
    stdout line is one JSON object whose numbers are the printed ones; --accelerator_estimate: the same peak with
    the float32 program's temporaries."""
    out = _inspect("--preset", "tiny-gemma3", "--what", "step", "--batch", "4", "--seq_len", "32", "--mesh",
                   "data=1,fsdp=1", "--lora_rank", "4", "--lora_targets", "q,v,down", "--remat", "--json",
                   "--accelerator_estimate")
    assert out.returncode == 0, out.stderr
    assert "LoRA rank 4, alpha 8 on q,v,down" in out.stdout
    n = json.loads(out.stdout.strip().splitlines()[-1])
    assert n["lora_rank"] == 4 and n["lora_targets"] == ["q", "v", "down"] and n["devices"] == 1
    assert abs(_mib(out.stdout, "peak ~") - n["peak_bytes_per_device"] / 2**20) < 1e-3
    # donated: the adapters (tiny-gemma3: 6 layers, rank 4) and two Adam moments, float32
    adapter_bytes = 4 * n["adapter_params"]
    assert n["adapter_params"] == 6 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))
    assert 3 * adapter_bytes <= n["alias_bytes"] < 3 * adapter_bytes + 1024
    assert 2 * n["params"] + 3 * adapter_bytes < n["argument_bytes"] < 2 * n["params"] + 3 * adapter_bytes + 4096
    assert n["peak_bytes_per_device"] >= n["argument_bytes"]
    assert n["accelerator_estimate_bytes"] == n["peak_bytes_per_device"] - n["temp_bytes"] + n["float32_temp_bytes"]
    assert "accelerator ~" in out.stdout


def test_bad_flags_are_one_line_errors():
    out = _inspect("--mesh", "data=two")
    assert out.returncode == 2 and "expected entries like data=2,fsdp=4" in out.stderr
    out = _inspect("--preset", "gemma9")
    assert out.returncode == 2 and "unknown preset 'gemma9'" in out.stderr
    out = _inspect("--preset", "tiny-gemma2", "--what", "step", "--lora_rank", "4", "--lora_targets", "q,ffn")
    assert out.returncode == 2 and "--lora_targets: unknown target(s) ['ffn']" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _inspect("--preset", "tiny-gemma2", "--what", "step", "--dtype", "float32", "--accelerator_estimate")
    assert out.returncode == 2 and "--accelerator_estimate needs --dtype bfloat16" in out.stderr


def test_a_machines_check_counts_bf16_storage_as_the_real_program_receives_it():
    """Reference: XLA's argument size of the real bfloat16 program. The check compiles a float32 stand-in and takes
    the difference off: params AND the Adam state (kept in the params' dtype; only the params were, a full
    fine-tuning check overstated 4 bytes per parameter), and no reference copy among the step's inputs (one was
    taken off, wrongly, with a KL term). That copy sits on the device beside the step and is added to the fit."""
    import jax.numpy as jnp

    import model
    from grpo import presets, program_inspect
    from model.lora import LoraConfig

    cfg, machine = model.tiny_config("gemma2"), presets.MACHINES["colab-tpu-v5e-1"]
    for lora, beta in ((None, 0.04), (LoraConfig(4), 0.0)):
        opts = program_inspect.InspectOptions(
            what="step", batch=4, seq_len=16, mesh="data=1,fsdp=1", data=1, fsdp=1, dtype="bfloat16",
            param_dtype=jnp.bfloat16, compute_dtype=None, lora_cfg=lora, num_micro_batches=1, remat=True, beta=beta,
            num_generations=2, shared_prompt=False, logits_chunk=8, logprob_tail=None)
        n = program_inspect.machine_check(cfg, opts, machine)
        real = program_inspect.lower(cfg, opts).compile().memory_analysis().argument_size_in_bytes
        assert n["argument_bytes"] == real, (lora, beta)
        assert n["reference_bytes_per_device"] == (cfg.num_params() * 2 if lora is None else 0)
