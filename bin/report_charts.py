"""bin/report's curves: one PNG per group of related metrics, so each can be taken out of the report on its own.

matplotlib (the `plot` extra) is optional: `pyplot()` returns None without it and the report says so instead of
showing images. Nothing here defines flags.
"""

from __future__ import annotations

import dataclasses
import io

from bin.report_data import Run, aha_shares, number, series

# (id, title, train curves [(metrics key, label)], eval curves [(eval.jsonl key, label)])
CURVES = (
    ("reward", "reward", [("reward_mean", "train (sampled, mean)")], [("eval_reward_mean", "eval (greedy)")]),
    ("solved", "solved fraction", [("solved_frac", "train (sampled)")], [("eval_solved_frac", "eval (greedy)")]),
    ("format", "format rate", [("format_frac", "train (sampled)")], [("eval_format_frac", "eval (greedy)")]),
    ("length", "completion length (tokens)", [("completion_len_mean", "mean"), ("completion_len_max", "max")], []),
    ("truncated", "truncated fraction (hit the token budget)", [("truncated_frac", "train")], []),
    ("kl", "KL to the reference policy", [("kl", "k3 estimate")], []),
    ("entropy", "entropy (nats per token)", [("entropy", "train")], []),
    ("clip", "clip fraction", [("clip_frac", "train")], []),
    ("grad_norm", "gradient norm", [("grad_norm", "global norm")], []),
    ("aha", "self-verification phrases per step", [("aha_count", "aha_count")], []),
    ("zero_std", "groups whose rewards are all equal", [("frac_zero_std_groups", "fraction of groups")], []),
)
DENSE = 40  # more points than this: no markers on train curves
SHARES = {"solved", "format", "truncated", "zero_std", "solved_by_level", "aha_share"}  # drawn on a 0..1 axis


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


def draw(plt, title: str, lines: list[Line], skipped: list[int] = (), yticks: list[str] | None = None,
         share: bool = False) -> bytes:
    """One small line chart as PNG bytes; skipped (non-finite) steps are shaded red. share: a 0..1 axis, so a
    flat rate reads as a level rather than as noise blown up to fill the plot."""
    fig, ax = plt.subplots(figsize=(6.2, 3.1), dpi=100)
    for ln in lines:
        if ln.kind == "step":
            ax.step(ln.xs, ln.ys, where="post", label=ln.label, lw=1.6)
        elif ln.kind == "eval":
            ax.plot(ln.xs, ln.ys, "o-", label=ln.label, lw=1.2, ms=4)
        else:
            ax.plot(ln.xs, ln.ys, ".-" if len(ln.xs) <= DENSE else "-", label=ln.label, lw=1.2, ms=4)
    for i, s in enumerate(skipped):
        ax.axvline(s, color="tab:red", alpha=0.25, lw=4, label="skipped step" if i == 0 else None)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks)
    if share:
        ax.set_ylim(-0.03, 1.03)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers, even on a 3-step run
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(lines) > 1 or skipped or (lines and lines[0].kind == "eval"):
        ax.legend(fontsize=8)
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


def make_charts(plt, run: Run) -> list[Chart]:
    """Every chart of the report, in reading order; the aha chart is last (the report shows it in its section)."""
    skipped = [m["step"] for m in run.metrics if number(m.get("skipped"))]
    charts = [Chart(cid, title, draw(plt, title, lines, skipped, share=cid in SHARES), keys)
              for cid, title, keys, lines in curve_lines(run)]
    if level := level_line(run):
        charts.append(Chart("level", "curriculum level", draw(plt, "curriculum level", [level[0]], skipped,
                                                                yticks=level[1]), "metrics.jsonl: level"))
    if lines := level_eval_lines(run):
        charts.append(Chart("solved_by_level", "eval solved rate per level",
                            draw(plt, "eval solved rate per level", lines, share=True), "eval.jsonl: solved_by_level"))
    if lines := aha_lines(run):
        title = "share of completions with a verification phrase"
        charts.append(Chart("aha_share", title, draw(plt, title, lines, skipped, share=True),
                            "aha_frac_solved, aha_frac_unsolved (or the stored samples)"))
    return charts
