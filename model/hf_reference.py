"""Running an HF transformers baseline beside our own benchmark: tests/bench_hf_generate.py (the sampler,
bin/bench_sample --compare_hf) and tests/bench_hf_train.py (the training step, bin/bench_train --compare_hf),
which need the `reference` extra.

Each runs in a subprocess, so torch and our JAX buffers never share memory, in the same invocation as ours, so
both sides see the same machine and load. A baseline prints its report and, with --json, one JSON object on its
last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "tests"


def run_reference_script(name: str, *args: str, echo: Callable[[str], None] = print) -> dict:
    """SCRIPTS/<name> with args and --json: its output passed to echo, the JSON object on its last line
    returned. A failure is a ValueError naming --compare_hf with the last line of the script's stderr."""
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args, "--json"], capture_output=True, text=True)
    echo(done.stdout)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise ValueError(f"--compare_hf: {name}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])
