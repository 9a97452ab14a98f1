"""The long kill sweep (not part of the suite): SIGKILL `bin/train` at N uniformly random moments, re-running
the same command after each, and check every run ends equal to an uninterrupted one.

    python tests/kill_sweep.py --kills 50 [--seed 0]

Same command, reference and tolerances as tests/test_kill_resume.py; each output directory is killed until
its run finishes, compared, and a fresh directory takes the remaining kills.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from test_kill_resume import _assert_same_run, _command, _env, _run_until
from tiny_model import make_tiny_model_dir


def sweep(kills_wanted: int, seed: int, work: Path) -> tuple[int, int]:
    tiny = make_tiny_model_dir(work / "model")
    env = _env(work / "jax_cache")
    reference = work / "reference"
    assert _run_until(_command(tiny, reference), env) == "finished"
    rng = random.Random(seed)
    kills, runs = 0, 0
    while kills < kills_wanted:
        out = work / f"killed{runs}"
        runs += 1
        while kills < kills_wanted:
            moment = time.monotonic() + rng.uniform(0.2, 25.0)
            if _run_until(_command(tiny, out), env, lambda m=moment: time.monotonic() > m) == "finished":
                break
            kills += 1
        status = out / "status.json"
        if not status.exists() or json.loads(status.read_text())["state"] != "finished":
            assert _run_until(_command(tiny, out), env) == "finished"
        _assert_same_run(out, reference)
        print(f"run {runs}: equal to the reference after {kills} kills so far", flush=True)
    return kills, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        kills, runs = sweep(args.kills, args.seed, Path(work))
    print(f"kill sweep: {kills} SIGKILLs at random moments over {runs} runs; every run equal to the reference")


if __name__ == "__main__":
    main()
