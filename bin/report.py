"""A run's report as ONE self-contained HTML page: curves, the 'aha' evidence, a completion browser, warnings.

    bin/report --run_dir runs/quickstart          # writes runs/quickstart/report.html; open it in any browser

Rebuilt from the run's files (metrics.jsonl, eval.jsonl, train_samples.jsonl, eval_samples.jsonl) at any time,
also while the run is still writing them. Images are inline PNGs (matplotlib, the `plot` extra; without it
the page says so), there is no script and nothing is fetched, so the file can be mailed or attached to an
issue. What is missing or unreadable (a line cut off by a killed run) is skipped and listed in the page.
This file is the flags; the report itself is grpo/report (reading, analysis, charts, the page).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from bin import cli
from bin.cli import FlagError

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A bin/train --output_dir (holds metrics.jsonl and the samples files).")
flags.DEFINE_string("out", None, "HTML file (.html or .htm). Default: <run_dir>/report.html.")
flags.DEFINE_integer("browse_steps", 6, "Steps shown in the completion browser: the first, the last, and evenly "
                     "spaced ones between.")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.expand_user("run_dir", "out")
    if not F.run_dir:
        raise FlagError("--run_dir is required")
    run_dir = Path(F.run_dir)
    if not run_dir.is_dir():
        raise FlagError(f"--run_dir: {'not a directory:' if run_dir.exists() else 'no such directory'} {run_dir}")
    if F.browse_steps < 1:
        raise FlagError(f"--browse_steps: expected a positive number of steps, got {F.browse_steps}")
    from grpo.report import OutError, build  # after the checks: the analysis imports grpo (and so jax)

    try:
        print(build(run_dir, Path(F.out) if F.out else run_dir / "report.html", F.browse_steps))
    except OutError as e:  # not an .html name, a directory, an unwritable folder: checked before the run is read
        raise FlagError(f"--out: {e}") from None
    except OSError as e:  # an unreadable run file
        raise FlagError(f"--run_dir: {e}") from None


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
