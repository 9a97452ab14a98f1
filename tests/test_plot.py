"""bin/plot and grpo.report.plot_curves: one figure with a panel per grpo.report.chart_specs chart.

References: the numbers are the ones written to metrics.jsonl / eval.jsonl here (compared exactly: matplotlib
stores what it was given); the panels are chart_specs' list in order; the PNG's size, read from its IHDR header,
is grid_size's inches times the DPI, to the pixel. A malformed line is a one-line error naming file and line.
"""

import json
import re
import struct
from pathlib import Path

import pytest
from binaries import run_tool

pytest.importorskip("matplotlib", reason="bin/plot needs the plot extra (CI installs it)")

from grpo.entropy_control import ENTROPY_BAND  # noqa: E402  (after the skip: grpo.report draws with matplotlib)
from grpo.report import (  # noqa: E402
    chart_specs,
    grid_figure,
    grid_size,
    image_formats,
    load_curves,
    plot_curves,
    pyplot,
)
from grpo.report.charts import DPI  # noqa: E402

STEPS = (1, 2, 3, 4)
METRICS = [{"step": s, "reward_mean": 0.1 * s, "entropy": 0.5 * s, "frac_zero_std_groups": 0.5,
            "frac_zero_std_solved": 0.25 * s, "oversample_ratio": float(s), "aha_count": s % 3, "kl": None}
           for s in STEPS]
# step 4's eval is the better one, so every panel marks step 4 as the best eval
EVALS = [{"step": 0, "eval_reward_mean": 0.1, "eval_solved_frac": 0.0, "eval_format_frac": 0.2},
         {"step": 4, "eval_reward_mean": 0.3, "eval_solved_frac": 0.25, "eval_format_frac": 0.5}]
# what METRICS / EVALS record, in chart_specs' order (kl is null: no panel)
PANELS = ["reward", "solved", "format", "entropy", "aha", "zero_std", "oversample"]


def write_run(d: Path) -> Path:
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVALS))
    return d


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk, the first after the 8-byte signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def plotted(ax) -> dict[str, tuple[list, list]]:
    """{label: (xs, ys)} of one panel's labelled matplotlib lines, as handed to matplotlib."""
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def column(rows: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in rows], [r[key] for r in rows]


def test_panels_hold_the_files_numbers(tmp_path):
    """Each panel is a chart_specs chart, in order, and its lines carry exactly the values of the files; the
    entropy panel has the healthy band, every panel the best eval's step; the unused panels are blank."""
    run = load_curves(write_run(tmp_path))
    specs = chart_specs(run)
    assert [s.id for s in specs] == PANELS
    plt = pyplot()
    fig = grid_figure(plt, specs, "title")
    try:
        shown = [ax for ax in fig.axes if ax.axison]
        assert [ax.get_title() for ax in shown] == [s.title for s in specs]
        assert len(fig.axes) == 9 and not any(ax.axison for ax in fig.axes[len(specs):])  # 3 rows of 3
        panel = dict(zip(PANELS, map(plotted, shown), strict=True))
        assert panel["reward"]["train (sampled, mean)"] == column(METRICS, "reward_mean")
        assert panel["reward"]["eval (greedy, top level)"] == column(EVALS, "eval_reward_mean")
        assert panel["solved"]["eval (greedy, top level)"] == column(EVALS, "eval_solved_frac")
        assert panel["entropy"]["train"] == column(METRICS, "entropy")
        assert panel["entropy"]["healthy band"][1] == [ENTROPY_BAND[0]] * 2
        assert panel["aha"]["aha_count"] == column(METRICS, "aha_count")
        assert panel["zero_std"]["rewards all equal"] == column(METRICS, "frac_zero_std_groups")
        assert panel["zero_std"]["solved outcomes all equal"] == column(METRICS, "frac_zero_std_solved")
        assert panel["oversample"]["ratio"] == column(METRICS, "oversample_ratio")
        assert all(p["best eval (step 4)"][0] == [4, 4] for p in panel.values())
        assert not any("healthy band" in p for name, p in panel.items() if name != "entropy")
        assert fig._suptitle.get_text() == "title"
    finally:
        plt.close(fig)


def test_cli_writes_png_of_the_requested_size(tmp_path):
    """`python -m bin.plot` writes <run_dir>/curves.png (or --out) and prints its path; 7 panels are 3 rows of 3,
    so the PNG is grid_size(7) inches at DPI: 1620 x 900 pixels."""
    d = write_run(tmp_path)
    res = run_tool("plot", "--run_dir", str(d))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(d / "curves.png")
    width, height = grid_size(len(PANELS))
    assert png_size(d / "curves.png") == (round(width * DPI), round(height * DPI)) == (1620, 900)
    out = plot_curves(pyplot(), d, tmp_path / "other.png")  # the library call writes the same figure
    assert png_size(out) == (1620, 900)


@pytest.mark.parametrize("text, why", [('{"step": 1}\n{oops\n', "2: not a JSON line"),
                                       ('{"step": 1}\n\n[1, 2]\n', "3: not a JSON object (list)")])
def test_malformed_metrics_line(tmp_path, text, why):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match="^" + re.escape(f"{tmp_path / 'metrics.jsonl'}:{why}") + "$"):
        plot_curves(pyplot(), tmp_path, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_a_cut_off_last_line_is_the_step_being_written(tmp_path):
    """A run killed mid-write (or still writing) ends metrics.jsonl in a line without its newline: the steps
    before it are drawn, as bin/report does; a bad line in the middle is still refused (above)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "rew')
    run = load_curves(tmp_path)
    assert [r["step"] for r in run.metrics] == [1]
    assert plot_curves(pyplot(), tmp_path, tmp_path / "c.png").is_file()


def test_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError, match=r"^no metrics in .*metrics.jsonl$"):
        plot_curves(pyplot(), tmp_path, tmp_path / "c.png")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"^nothing recorded to draw in .*metrics.jsonl$"):
        plot_curves(pyplot(), tmp_path, tmp_path / "c.png")


def test_cli_errors_are_one_line_naming_the_flag(tmp_path):
    """Exit 2 and one `error: --flag: ...` line, as every bin/ tool reports a user's mistake."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    cases = [(["--run_dir", str(tmp_path)], f"--run_dir: {tmp_path / 'metrics.jsonl'}:2: not a JSON line"),
             (["--run_dir", str(tmp_path / "nope")], f"--run_dir: no such directory {tmp_path / 'nope'}"),
             (["--run_dir", str(tmp_path), "--out", str(tmp_path / "no" / "c.png")],
              f"--out: no such directory {tmp_path / 'no'}"),
             ([], "--run_dir is required")]
    for args, message in cases:
        res = run_tool("plot", *args)
        assert (res.returncode, res.stderr.strip()) == (2, f"error: {message}"), args


def test_out_errors_name_out_and_write_nothing(tmp_path):
    """A directory used to get `<dir>.png` beside it, a name without a suffix `<name>.png` while the tool printed
    the name, an unwritable folder a traceback, an unknown suffix an error blamed on --run_dir: each is now one line
    naming --out, exit 2, nothing written. The formats listed are matplotlib's own (savefig's)."""
    (tmp_path / "run").mkdir()
    d = write_run(tmp_path / "run")
    images = "a file name ending in " + ", ".join(f".{f}" for f in image_formats())
    cases = [(d, f"{d} is a directory (expected {images})"),
             (d / "noext", f"expected {images}, got {d / 'noext'}"),
             (d / "c.txt", f"expected {images}, got {d / 'c.txt'}"),
             (Path("/proc/c.png"), "cannot write into /proc (")]
    for out, message in cases:
        res = run_tool("plot", "--run_dir", str(d), "--out", str(out))
        assert res.returncode == 2 and res.stderr.startswith(f"error: --out: {message}"), (out, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval.jsonl", "metrics.jsonl", "run"]


@pytest.mark.parametrize("name, magic", [("c.pdf", b"%PDF"), ("c.svg", b"<?xml"), ("C.PNG", b"\x89PNG")])
def test_the_suffix_picks_the_format(tmp_path, name, magic):
    """The file written is the one named, in the format its suffix names (any case); nothing else is left."""
    out = plot_curves(pyplot(), write_run(tmp_path), tmp_path / name)
    assert out == tmp_path / name and out.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "eval.jsonl", "metrics.jsonl"])
