"""Summarise a jax.profiler trace per HLO op, named by source scope (grpo/profile_ops.py).

    bin/bench_train --rows 16 --repeats 1 --tails completion --profile_dir runs/prof   # writes and summarises
    python -m bin.profile_ops runs/prof/completion                                         # summarise again
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpo.profile_ops import scope_names, summary, top_ops


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m bin.profile_ops TRACE_DIR   (a --profile_dir of bin/bench_train or bin/train)")
    hlo = Path(argv[1]) / "step.hlo.txt"
    names = scope_names(hlo.read_text()) if hlo.exists() else None
    print(summary(top_ops(argv[1]), names, top=25))


if __name__ == "__main__":
    main(sys.argv)
