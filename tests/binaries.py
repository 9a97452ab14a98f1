"""How the tests start a tool of bin/: as users do, `python -m bin.<name>` or through the `bin/<name>` launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# XLA:CPU's cheap code generation for the suite and the tools it starts: the suite is bound by compiling many small
# programs. The cheap LLVM pipeline, and the loop emitters instead of the MLIR fusion emitters (which cost most
# of a small program's compile); the HLO passes (what a program computes) are the same (BUILD.md "Tests").
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def run_tool(name: str, *args: str, launcher: bool = False, env: dict | None = None,
             timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run bin/<name> with this interpreter on CPU (no fake devices unless the tool makes its own).

    launcher=False: `python -m bin.<name>` from the repo root; True: the `bin/<name>` launcher script (from cwd).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "PYTHON": sys.executable, **(env or {})}
    cmd = [str(ROOT / "bin" / name)] if launcher else [sys.executable, "-m", f"bin.{name}"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# The resilience tests (kill/resume, damage, multi-host) pin the loop they were written for: TinyZero's puzzles,
# full fine-tuning, every group in the loss. bin/train's defaults moved on (the ladder, LoRA rank 16, the
# zero-std filter); test_train_cli.py runs those defaults end to end.
CLASSIC_LOOP = ("--curriculum=off", "--lora_rank=0", "--noskip_zero_std_groups")


def train_in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """bin/train's main on this command line in the test process (`bin.train.run(argv)` under absl's flagsaver):
    (exit status, stdout, stderr) as a subprocess's, for checks that are not about the process boundary. The
    process has the suite's 8 fake CPU devices (tests/conftest.py), where `run_tool` gives bin/train one."""
    from absl.testing import flagsaver

    from bin import train as train_bin

    with flagsaver.flagsaver():
        try:
            train_bin.run(["bin/train", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
