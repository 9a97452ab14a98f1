"""Turn a run's metrics.jsonl (and eval.jsonl) into one PNG of the training curves.

    bin/plot --run_dir runs/quickstart            # writes runs/quickstart/curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from bin import cli
from bin.cli import FlagError

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A bin/train --output_dir (holds metrics.jsonl).")
flags.DEFINE_string("out", None, "PNG path. Default: <run_dir>/curves.png.")

PANELS = (
    ("reward_mean", "reward (mean)"),
    ("solved_frac", "solved fraction"),
    ("format_frac", "format rate"),
    ("completion_len_mean", "completion length (tokens)"),
    ("kl", "KL to reference (k3)"),
    ("aha_count", "self-verification phrases"),
)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not a JSON line") from None
    return rows


def plot(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlagError("bin/plot needs matplotlib: pip install -e '.[plot]'") from None
    steps = read_jsonl(run_dir / "metrics.jsonl")
    if not steps:
        raise FlagError(f"--run_dir: no metrics in {run_dir / 'metrics.jsonl'}")
    evals = read_jsonl(run_dir / "eval.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        pts = [(m["step"], m[key]) for m in steps if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label="train (sampled)", lw=1.2)
        eval_key = {"reward_mean": "eval_reward_mean", "solved_frac": "eval_solved_frac",
                    "format_frac": "eval_format_frac"}.get(key)
        if eval_key and evals:
            ax.plot([e["step"] for e in evals], [e[eval_key] for e in evals], "o-", label="eval (greedy)")
            ax.legend(fontsize=8)
        if not pts and not (eval_key and evals):
            ax.text(0.5, 0.5, "not recorded", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"GRPO on Countdown: {run_dir}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
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
    except ValueError as e:  # a malformed JSON line: file and line number
        raise FlagError(f"--run_dir: {e}") from None


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
