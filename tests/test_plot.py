"""bin/plot draws a PNG from metrics.jsonl; a malformed line is a one-line error naming file and line."""

import json

import pytest

pytest.importorskip("matplotlib", reason="bin/plot needs the plot extra (CI installs it)")
from bin import plot as plot_bin  # noqa: E402  (after the skip: bin.plot draws with matplotlib)


def test_plot_writes_png(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1 * s, "solved_frac": 0.0, "format_frac": 0.5, "completion_len_mean": 40,
             "kl": None, "aha_count": s} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 0, "eval_reward_mean": 0.1, "eval_solved_frac": 0.0,
                                                     "eval_format_frac": 0.2}) + "\n")
    out = plot_bin.plot(tmp_path, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_malformed_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        plot_bin.plot(tmp_path, tmp_path / "c.png")


def test_plot_draws_the_report_curves(tmp_path, monkeypatch):
    """bin/plot draws bin/report's chart_specs, one panel each: the new per-step keys (entropy with its band, both
    zero-std shares, the oversample ratio) reach the figure with the recorded values; unrecorded ones get none."""
    from bin import report_charts
    from grpo.entropy_control import ENTROPY_BAND

    rows = [{"step": s, "reward_mean": 0.1 * s, "entropy": 0.5 * s, "frac_zero_std_groups": 0.5,
             "frac_zero_std_solved": 0.25 * s, "oversample_ratio": float(s)} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    draw_on = report_charts.draw_on
    monkeypatch.setattr(report_charts, "draw_on", lambda ax, spec: drawn.append(spec) or draw_on(ax, spec))
    out = plot_bin.plot(tmp_path, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    specs = {s.id: s for s in drawn}
    assert sorted(specs) == ["entropy", "oversample", "reward", "zero_std"]
    assert specs["entropy"].band == ENTROPY_BAND and specs["entropy"].lines[0].ys == [0.5, 1.0, 1.5, 2.0]
    assert [ln.ys for ln in specs["zero_std"].lines] == [[0.5] * 4, [0.25, 0.5, 0.75, 1.0]]
    assert specs["oversample"].lines[0].ys == [1.0, 2.0, 3.0, 4.0]


def test_nothing_recorded_is_one_flag_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(plot_bin.FlagError, match=r"^--run_dir: nothing recorded to draw in .*metrics.jsonl$"):
        plot_bin.plot(tmp_path, tmp_path / "c.png")
