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
