"""The report's curves: chart_specs(run) is the one list of what is drawn, and two views draw it.

A ChartSpec holds the numbers of every line and its decorations (the healthy entropy band, the best eval's step,
skipped steps), before anything is drawn. bin/report draws each spec into its own PNG (`make_charts`), so each
can be taken out of the page on its own; bin/plot draws the same specs as panels of one figure (`plot_curves`),
so the two never disagree on a curve. matplotlib (the `plot` extra) is optional: `pyplot()` returns None without
it and the report says so instead of showing images.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

from grpo.entropy_control import ENTROPY_BAND
from grpo.report.analysis import aha_by_level_rows, aha_shares, best_eval
from grpo.report.output import check_out, image_formats, write_whole
from grpo.report.reading import Run, load_curves, number, series

# (id, title, train curves [(metrics key, label)], eval curves [(eval.jsonl key, label)]). The eval's headline
# rates are the top level's (grpo/evaluation.py); the per-level ones have a chart of their own.
EVAL = "eval (greedy, top level)"
CURVES = (
    ("reward", "reward", [("reward_mean", "train (sampled, mean)")], [("eval_reward_mean", EVAL)]),
    ("solved", "solved fraction", [("solved_frac", "train (sampled)")], [("eval_solved_frac", EVAL)]),
    ("format", "format rate", [("format_frac", "train (sampled)")], [("eval_format_frac", EVAL)]),
    ("length", "completion length (tokens)", [("completion_len_mean", "mean"), ("completion_len_max", "max")], []),
    ("truncated", "truncated fraction (hit the token budget)", [("truncated_frac", "train")], []),
    ("kl", "KL to the reference policy", [("kl", "k3 estimate")], []),
    ("entropy", "entropy (nats per token)", [("entropy", "train")], []),
    ("entropy_coef", "adaptive entropy bonus applied", [("entropy_coef_applied", "coefficient")], []),
    ("clip", "clip fraction", [("clip_frac", "train")], []),
    ("grad_norm", "gradient norm", [("grad_norm", "global norm")], []),
    ("aha", "self-verification phrases per step", [("aha_count", "aha_count")], []),
    ("zero_std", "groups without signal (before dynamic sampling)",
     [("frac_zero_std_groups", "rewards all equal"), ("frac_zero_std_solved", "solved outcomes all equal")], []),
    ("oversample", "prompts sampled / prompts per step (dynamic sampling)", [("oversample_ratio", "ratio")], []),
)
DENSE = 40  # more points than this: no markers on train curves
SHARES = {"solved", "format", "truncated", "zero_std"}  # curves drawn on a 0..1 axis
BANDS = {"entropy": ENTROPY_BAND}  # curves with a healthy band drawn as two dashed lines
DPI = 100
CHART_INCHES = (6.2, 3.1)  # one report chart (width, height): about one column of the page's two-column grid
COLUMNS = 3  # bin/plot's panels per row
PANEL_INCHES = (5.4, 3.0)  # one bin/plot panel (width, height): the longest curve title fits
TITLE_INCHES = 0.4  # above bin/plot's panels, for the figure's title


@dataclasses.dataclass(frozen=True)
class Line:
    label: str
    xs: list[int]
    ys: list[float]
    kind: str = "train"  # train | eval | step


@dataclasses.dataclass(frozen=True)
class Chart:
    id: str
    title: str
    png: bytes
    keys: str = ""  # where the numbers come from, for the caption


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when the plot extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@dataclasses.dataclass(frozen=True)
class ChartSpec:
    """One chart's data and decorations, before anything is drawn."""

    id: str
    title: str
    keys: str  # where the numbers come from, for the caption
    lines: list[Line]
    skipped: tuple[int, ...] = ()  # non-finite steps, shaded red
    share: bool = False  # a 0..1 axis, so a flat rate reads as a level rather than as noise blown up
    band: tuple[float, float] | None = None  # (low, high) drawn as dashed lines: the healthy entropy band
    best_step: int | None = None  # a dotted line at the best held-out eval's step (best/)
    yticks: list[str] | None = None  # names for the integer y values (the curriculum level)


def _plain(text: str) -> str:
    """Text as matplotlib shows it verbatim: a "$" (a hand-edited level name) would start math mode."""
    return str(text).replace("$", r"\$")


def draw_on(ax, spec: ChartSpec) -> None:
    """spec's lines and decorations on one matplotlib Axes."""
    for ln in spec.lines:
        if ln.kind == "step":
            ax.step(ln.xs, ln.ys, where="post", label=_plain(ln.label), lw=1.6)
        elif ln.kind == "eval":
            ax.plot(ln.xs, ln.ys, "o-", label=_plain(ln.label), lw=1.2, ms=4)
        else:
            ax.plot(ln.xs, ln.ys, ".-" if len(ln.xs) <= DENSE else "-", label=_plain(ln.label), lw=1.2, ms=4)
    for i, s in enumerate(spec.skipped):
        ax.axvline(s, color="tab:red", alpha=0.25, lw=4, label="skipped step" if i == 0 else None)
    if spec.best_step is not None:
        ax.axvline(spec.best_step, color="tab:green", ls=":", lw=1.5, label=f"best eval (step {spec.best_step})")
    for i, y in enumerate(spec.band or ()):
        ax.axhline(y, color="gray", ls="--", lw=1, label="healthy band" if i == 0 else None)
    if spec.yticks is not None:
        ax.set_yticks(range(len(spec.yticks)), [_plain(t) for t in spec.yticks])
    if spec.share:
        ax.set_ylim(-0.03, 1.03)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers, even on a 3-step run
    ax.set_title(_plain(spec.title), fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    lines = spec.lines
    if len(lines) > 1 or spec.skipped or spec.band or spec.best_step is not None or (lines and lines[0].kind == "eval"):
        ax.legend(fontsize=8)


def draw(plt, spec: ChartSpec) -> bytes:
    """One small line chart as PNG bytes."""
    fig, ax = plt.subplots(figsize=CHART_INCHES, dpi=DPI)
    draw_on(ax, spec)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def curve_lines(run: Run) -> list[tuple[str, str, str, list[Line]]]:
    """(id, title, keys, lines) for every curve group the run recorded; groups with no data are left out."""
    out = []
    for cid, title, train, evals in CURVES:
        lines = [(key, Line(label, *series(run.metrics, key))) for key, label in train]
        lines += [(key, Line(label, *series(run.evals, key), kind="eval")) for key, label in evals]
        lines = [(key, ln) for key, ln in lines if ln.xs]
        if lines:
            out.append((cid, title, ", ".join(k for k, _ in lines), [ln for _, ln in lines]))
    return out


def level_line(run: Run) -> tuple[Line, list[str]] | None:
    """The curriculum level per step as a step function of the level's index (levels in order of appearance)."""
    pts = [(m["step"], m["level"]) for m in run.metrics if isinstance(m.get("level"), str)]
    if not pts:
        return None
    names = list(dict.fromkeys(name for _, name in pts))
    return Line("curriculum level", [s for s, _ in pts], [names.index(n) for _, n in pts], kind="step"), names


def level_eval_lines(run: Run) -> list[Line]:
    """Eval solved rate per level (eval.jsonl's solved_by_level), one line per level."""
    rows = [(e["step"], e["solved_by_level"]) for e in run.evals if isinstance(e.get("solved_by_level"), dict)]
    names = list(dict.fromkeys(k for _, d in rows for k in d))
    lines = []
    for name in names:
        pts = [(s, v) for s, d in rows if (v := number(d.get(name))) is not None]
        if pts:
            lines.append(Line(str(name), [p[0] for p in pts], [p[1] for p in pts], kind="eval"))
    return lines


def aha_lines(run: Run) -> list[Line]:
    """Share of completions with a verification phrase, among solved and among unsolved ones, per step."""
    rows = aha_shares(run.metrics, run.train_samples)
    out = []
    for i, label in ((1, "solved completions"), (2, "unsolved completions")):
        pts = [(r[0], r[i]) for r in rows if r[i] is not None]
        if pts:
            out.append(Line(label, [p[0] for p in pts], [p[1] for p in pts]))
    return out


def aha_eval_lines(run: Run) -> list[Line]:
    """The held-out share of completions with a verification phrase per level (eval.jsonl's aha_by_level); the
    first point, step 0, is the base model's baseline."""
    rows = aha_by_level_rows(run.evals)
    names = list(dict.fromkeys(k for _, d in rows for k in d))
    lines = []
    for name in names:
        pts = [(s, v) for s, d in rows if (v := number((d.get(name) or {}).get("aha_frac"))) is not None]
        if pts:
            lines.append(Line(str(name), [p[0] for p in pts], [p[1] for p in pts], kind="eval"))
    return lines


def level_share_lines(run: Run) -> list[Line]:
    """The level mix each step drew its prompts from (metrics.jsonl level_shares), one line per level; a level
    a step did not draw from counts as 0 once the mix has been recorded."""
    rows = [(m["step"], m["level_shares"]) for m in run.metrics if isinstance(m.get("level_shares"), dict)]
    names = list(dict.fromkeys(str(k) for _, d in rows for k in d))
    lines = []
    for name in names:
        pts = [(s, 0.0 if name not in d else number(d[name])) for s, d in rows]
        pts = [(s, v) for s, v in pts if v is not None]
        if pts:
            lines.append(Line(name, [p[0] for p in pts], [p[1] for p in pts]))
    return lines


def chart_specs(run: Run) -> list[ChartSpec]:
    """Every chart of the report, in reading order; the aha chart is last (the report shows it in its section)."""
    skipped = tuple(m["step"] for m in run.metrics if number(m.get("skipped")))
    best = (best_eval(run.evals) or {}).get("step")
    specs = [ChartSpec(cid, title, keys, lines, skipped, share=cid in SHARES, best_step=best,
                       band=BANDS.get(cid)) for cid, title, keys, lines in curve_lines(run)]
    if level := level_line(run):
        specs.append(ChartSpec("level", "curriculum level", "metrics.jsonl: level", [level[0]], skipped,
                               best_step=best, yticks=level[1]))
    if lines := level_share_lines(run):
        specs.append(ChartSpec("level_shares", "share of the step's prompts per level", "metrics.jsonl: level_shares",
                               lines, skipped, share=True, best_step=best))
    if lines := level_eval_lines(run):
        specs.append(ChartSpec("solved_by_level", "eval solved rate per level", "eval.jsonl: solved_by_level", lines,
                               share=True, best_step=best))
    if lines := aha_lines(run):
        specs.append(ChartSpec("aha_share", "share of completions with a verification phrase",
                               "aha_frac_solved, aha_frac_unsolved (or the stored samples)", lines, skipped,
                               share=True, best_step=best))
    if lines := aha_eval_lines(run):
        base = " (step 0: base model)" if min(x for ln in lines for x in ln.xs) == 0 else ""
        specs.append(ChartSpec("aha_by_level", f"held-out completions with a verification phrase{base}",
                               "eval.jsonl: aha_by_level", lines, share=True, best_step=best))
    return specs


def make_charts(plt, run: Run) -> list[Chart]:
    """Every chart_specs chart as its own PNG."""
    return [Chart(s.id, s.title, draw(plt, s), s.keys) for s in chart_specs(run)]


def grid_size(panels: int) -> tuple[float, float]:
    """bin/plot's figure size in inches: COLUMNS panels to a row, as many rows as the panels need."""
    return PANEL_INCHES[0] * COLUMNS, PANEL_INCHES[1] * math.ceil(panels / COLUMNS)


def grid_figure(plt, specs: list[ChartSpec], title: str):
    """Every spec as one panel of a single matplotlib Figure, in order; the panels left over in the last row
    are blank."""
    rows = math.ceil(len(specs) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=grid_size(len(specs)), squeeze=False)
    for ax, spec in zip(axes.flat, specs, strict=False):
        draw_on(ax, spec)
    for ax in axes.flat[len(specs):]:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - TITLE_INCHES / fig.get_figheight()))  # room for the suptitle
    return fig


def plot_curves(plt, run_dir: Path, out: Path) -> Path:
    """bin/plot: run_dir's curves as one image at out, in the format its suffix names (png, pdf, svg, ...).
    OutError (checked before anything is read) for an out that cannot be written; ValueError (naming the file)
    when a line is malformed or nothing was recorded that a chart could show."""
    check_out(out, image_formats())
    run = load_curves(run_dir)
    if not run.metrics:
        raise ValueError(f"no metrics in {run_dir / 'metrics.jsonl'}")
    specs = chart_specs(run)
    if not specs:
        raise ValueError(f"nothing recorded to draw in {run_dir / 'metrics.jsonl'}")
    fig = grid_figure(plt, specs, f"GRPO on Countdown: {run_dir}")
    try:  # the format named, as the temporary file's suffix names none
        return write_whole(out, lambda tmp: fig.savefig(tmp, dpi=DPI, format=out.suffix[1:].lower()))
    finally:
        plt.close(fig)
