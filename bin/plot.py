"""Turn a run's metrics.jsonl (and eval.jsonl) into one PNG of the training curves.

    bin/plot --run_dir runs/quickstart            # writes runs/quickstart/curves.png

The curves are bin/report's (bin/report_charts.chart_specs: the same lines, the entropy band, the best eval's
step), drawn as panels of one figure; only what the run recorded gets a panel. Unlike bin/report, a malformed
line is an error here, naming file and line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from absl import flags

from bin import cli
from bin.cli import FlagError

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A bin/train --output_dir (holds metrics.jsonl).")
flags.DEFINE_string("out", None, "PNG path. Default: <run_dir>/curves.png.")

COLUMNS = 3  # panels per row
PANEL = (5.4, 3.0)  # inches per panel (width, height): the longest curve title fits
TITLE_INCHES = 0.4  # above the panels, for the figure's title


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: not a JSON object ({type(row).__name__})")
            rows.append(row)
    return rows


def plot(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlagError("bin/plot needs matplotlib: pip install -e '.[plot]'") from None
    from bin.report_charts import chart_specs, draw_on  # after the checks: the analysis imports grpo (and so jax)
    from bin.report_data import Run, by_step

    notes: list[str] = []
    metrics = by_step(read_jsonl(run_dir / "metrics.jsonl"), "metrics.jsonl", notes)
    if not metrics:
        raise FlagError(f"--run_dir: no metrics in {run_dir / 'metrics.jsonl'}")
    run = Run(run_dir, metrics, by_step(read_jsonl(run_dir / "eval.jsonl"), "eval.jsonl", notes), [], [], None, notes)
    specs = chart_specs(run)
    if not specs:
        raise FlagError(f"--run_dir: nothing recorded to draw in {run_dir / 'metrics.jsonl'}")
    rows = math.ceil(len(specs) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(PANEL[0] * COLUMNS, PANEL[1] * rows), squeeze=False)
    for ax, spec in zip(axes.flat, specs, strict=False):
        draw_on(ax, spec)
    for ax in axes.flat[len(specs):]:
        ax.set_axis_off()
    fig.suptitle(f"GRPO on Countdown: {run_dir}")
    fig.tight_layout(rect=(0, 0, 1, 1 - TITLE_INCHES / fig.get_figheight()))  # room for the suptitle
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv):
    cli.no_extra_args(argv)
    if not F.run_dir:
        raise FlagError("--run_dir is required")
    run_dir = Path(F.run_dir)
    if not run_dir.is_dir():
        raise FlagError(f"--run_dir: no such directory {run_dir}")
    try:
        print(plot(run_dir, Path(F.out) if F.out else run_dir / "curves.png"))
    except FlagError:  # already names its flag (FlagError is a ValueError)
        raise
    except ValueError as e:  # a malformed JSON line: file and line number
        raise FlagError(f"--run_dir: {e}") from None


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
