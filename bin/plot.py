"""Turn a run's metrics.jsonl (and eval.jsonl) into one image of the training curves (PNG unless --out says).

    bin/plot --run_dir runs/quickstart            # writes runs/quickstart/curves.png

The curves are bin/report's (grpo.report.chart_specs: the same lines, the entropy band, the best eval's step),
drawn as panels of one figure by grpo.report.plot_curves; only what the run recorded gets a panel. Unlike
bin/report, a malformed line is an error here, naming file and line: a PNG has no place to list what it skipped.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from bin import cli
from bin.cli import FlagError

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A bin/train --output_dir (holds metrics.jsonl).")
flags.DEFINE_string("out", None, "Image file: .png, .pdf, .svg, ... (its suffix). Default: <run_dir>/curves.png.")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.expand_user("run_dir", "out")
    if not F.run_dir:
        raise FlagError("--run_dir is required")
    run_dir = Path(F.run_dir)
    if not run_dir.is_dir():
        raise FlagError(f"--run_dir: {'not a directory:' if run_dir.exists() else 'no such directory'} {run_dir}")
    from grpo.report import OutError, plot_curves, pyplot  # after the checks: the analysis imports grpo (and so jax)

    plt = pyplot()
    if plt is None:
        raise FlagError("bin/plot needs matplotlib: pip install -e '.[plot]'")
    try:
        print(plot_curves(plt, run_dir, Path(F.out) if F.out else run_dir / "curves.png"))
    except OutError as e:  # no suffix matplotlib writes, a directory, an unwritable folder: checked before reading
        raise FlagError(f"--out: {e}") from None
    except (ValueError, OSError) as e:  # a malformed JSON line (file and line number), nothing to draw, unreadable
        raise FlagError(f"--run_dir: {e}") from None


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
