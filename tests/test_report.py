"""grpo.report (and bin/report, run as a tool): the page builds from a tiny run's files (current and old line
formats), is well-formed HTML with decodable inline images, marks verification phrases in the right completion,
raises each warning on the runs that should trigger it and none on a healthy one, survives missing / cut-off
files, and renders in Chromium.

The run files are written here by hand, in the formats bin/train writes (see grpo/report/reading.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from binaries import run_tool

from grpo import report
from grpo.report import load_run, warnings

PNG = b"\x89PNG\r\n\x1a\n"
SOLVED = ("<think>40 - 12 = 28, 28 + 5 = 33. Wait, that is not 52. Let me try 40 + 12 = 52.</think> "
          "<answer>40 + 12</answer>")
PLAIN = "<think>12 + 5 + 40 = 57</think> <answer>12 + 5 + 40</answer>"


def write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def metric_row(step: int, **over) -> dict:
    """A healthy step: every key bin/train writes, nothing alarming."""
    row = {"step": step, "reward_mean": 0.1 + 0.03 * step, "reward_std": 0.3, "solved_frac": 0.02 * step,
           "format_frac": min(1.0, 0.2 + 0.1 * step), "completion_len_mean": 60 + step, "completion_len_max": 128,
           "truncated_frac": 0.1, "sample_s": 2.0, "sample_tokens_per_s": 300.0, "aha_count": step % 3,
           "aha_frac": 0.1, "aha_frac_solved": 0.5, "aha_frac_unsolved": 0.1, "aha/wait": 1.0, "loss": 0.01,
           "pg_loss": 0.01, "clip_frac": 0.01, "entropy": 1.2, "kl": None, "grad_norm": 0.5,
           "learning_rate": 1e-5, "num_completion_tokens": 500, "skipped": 0.0, "train_s": 3.0,
           "train_tokens_per_s": 900.0, "level": "3 numbers" if step <= 6 else "4 numbers",
           "frac_zero_std_groups": 0.25}
    return {**row, **over}


def sample_row(step: int, group: int, completion: str = PLAIN, reward: float = 0.1, **over) -> dict:
    solved = reward == 1.0
    return {"step": step, "group": group, "nums": [12, 5, 40], "target": 52 + group, "completion": completion,
            "reward": reward, "solved": solved, "format": True, "length": len(completion) // 4,
            "truncated": False, **over}


def new_run(d: Path, steps: int = 12, g: int = 4) -> Path:
    """A healthy run in the current format; step 5, group 1, completion 2 is the first solved one with 'Wait'."""
    d.mkdir(exist_ok=True)
    write_jsonl(d / "metrics.jsonl", [metric_row(s) for s in range(1, steps + 1)])
    write_jsonl(d / "eval.jsonl", [{"step": s, "eval_solved_frac": s / 40, "eval_format_frac": 0.5,
                                    "eval_reward_mean": 0.2, "eval_s": 4.0,
                                    "solved_by_level": {"3 numbers": s / 40, "4 numbers": s / 80}}
                                   for s in (0, 6, steps)])
    rows = []
    for s in range(1, steps + 1):
        for grp in range(2):
            for i in range(g):
                hit = (s >= 5 and grp == 1 and i == 1)
                rows.append(sample_row(s, grp, SOLVED if hit else PLAIN, 1.0 if hit else 0.1 * i))
    write_jsonl(d / "train_samples.jsonl", rows)
    write_jsonl(d / "eval_samples.jsonl", [sample_row(s, i, PLAIN, 0.1, level="3 numbers")
                                           for s in (0, 6, steps) for i in range(3)])
    return d


def old_run(d: Path) -> Path:
    """A run written before samples became data: `item` reprs, two completions per step, no flags."""
    d.mkdir(exist_ok=True)
    write_jsonl(d / "metrics.jsonl", [{k: v for k, v in metric_row(s).items()
                                       if k not in ("level", "frac_zero_std_groups", "aha_frac_solved",
                                                    "aha_frac_unsolved")} for s in range(1, 6)])
    item = "Puzzle(nums=(12, 5, 40), target=52, solution='40 + 12')"
    rows = [{"step": s, "item": item, "completion": SOLVED if s == 3 and i == 0 else PLAIN,
             "reward": 1.0 if s == 3 and i == 0 else 0.1} for s in range(1, 6) for i in range(2)]
    rows.append({"step": 5, "item": "Toy(<x & y>)", "completion": "hmm", "reward": 0.0})
    write_jsonl(d / "train_samples.jsonl", rows)
    write_jsonl(d / "eval.jsonl", [{"step": 0, "eval_solved_frac": 0.0, "eval_format_frac": 0.1,
                                    "eval_reward_mean": 0.01, "eval_s": 3.0}])
    write_jsonl(d / "eval_samples.jsonl", [{"step": 0, "item": item, "completion": PLAIN, "reward": 0.1}])
    return d


class StrictParser(HTMLParser):
    """Checks that every element is closed in order (void elements excepted) and collects <img> sources."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(text: str) -> StrictParser:
    assert text.startswith("<!DOCTYPE html>")
    p = StrictParser()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def build(d: Path) -> str:
    return report.build(d, d / "report.html").read_text()


def page(d: Path) -> str:
    """The page without charts: for the tests that are about text, not images (drawing takes seconds)."""
    return report.render(load_run(d), None, "now")


def decode_images(parser: StrictParser) -> list[bytes]:
    out = []
    for attrs in parser.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert out[-1].startswith(PNG)
    return out


def test_report_builds_from_new_format(tmp_path):
    pytest.importorskip("matplotlib", reason="the curves need the plot extra (CI installs it)")
    text = build(new_run(tmp_path / "run"))
    parser = check_html(text)
    pngs = decode_images(parser)
    # 10 curve groups + level + per-level eval + aha share; left out as not recorded: kl (null, beta == 0),
    # entropy_coef_applied, oversample_ratio, level_shares
    assert len(pngs) == 13, [a["alt"] for a in parser.images]
    from PIL import Image  # matplotlib depends on pillow

    assert all(Image.open(io.BytesIO(png)).size == (620, 310) for png in pngs)
    assert "curriculum level" in text and "eval solved rate per level" in text
    assert "No warnings" in text
    # the first solved aha is step 5, group 1, completion #2: its text, marked, inside a solved block
    first = text.split("First solved training completion with a verification phrase:</b> step 5,")[1]
    block = re.search(r'<div class="c solved">(.*?)</div></div>|<div class="c solved">.*?</pre></div>', first, re.S)
    assert block and "<mark>Wait</mark>, that is not 52. <mark>Let me try</mark>" in block.group(0)
    assert "<pre>&lt;think&gt;12 + 5 + 40 = 57&lt;/think&gt; &lt;answer&gt;12 + 5 + 40&lt;/answer&gt;</pre>" in text
    assert "[12, 5, 40] \u2192 53 \u00b7 1/4 solved" in text  # group 1 of a browsed step


def test_browser_picks_first_last_and_spaced_steps(tmp_path):
    text = page(new_run(tmp_path / "run", steps=30))
    assert "Steps 1, 7, 13, 18, 24, 30 of 30" in text
    assert not re.search(r"<summary>Step 2 ", text)


def test_no_external_resources(tmp_path):
    text = build(new_run(tmp_path / "run"))
    assert "<script" not in text and not re.search(r"""(src|href)=["']?(https?:|//)""", text)


def test_old_format_still_readable(tmp_path):
    d = old_run(tmp_path / "old")
    run = load_run(d)
    assert [s.group for s in run.train_samples if s.step == 5] == [0, 0, 1]
    text = build(d)
    check_html(text)
    assert "[12, 5, 40] \u2192 52" in text  # nums and target parsed out of the Puzzle repr
    assert "Toy(&lt;x &amp; y&gt;)" in text  # an item that is not a Puzzle is shown as it was, escaped
    assert "step 3," in text.split("First solved training completion")[1][:200]  # reward 1.0 counts as solved
    assert "<mark>hmm</mark>" in text


def test_model_text_is_escaped(tmp_path):
    d = new_run(tmp_path / "run", steps=2)
    evil = "</pre></details><script>alert(1)</script> <img src=x onerror=alert(1)> & wait"
    write_jsonl(d / "train_samples.jsonl", [sample_row(1, 0, evil, 1.0), sample_row(2, 0, evil, 0.0)])
    text = page(d)
    check_html(text)
    assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt; &amp; <mark>wait</mark>" in text


def _metrics(d: Path, rows: list[dict]) -> Path:
    d.mkdir(exist_ok=True)
    write_jsonl(d / "metrics.jsonl", rows)
    return d


WARNING_RUNS = {
    "collapse": ([metric_row(s, completion_len_mean=100 if s <= 5 else 12, completion_len_max=128)
                  for s in range(1, 9)], "Completion length collapsed", (6, 7, 8)),
    "truncated": ([metric_row(s, truncated_frac=1.0 if s > 2 else 0.2) for s in range(1, 9)],
                  "Completion length pinned at the budget", (3, 4, 5, 6, 7, 8)),
    "mean_is_max": ([metric_row(s, completion_len_mean=128, completion_len_max=128) for s in range(1, 6)],
                    "Completion length pinned at the budget", (1, 2, 3, 4, 5)),
    "zero_std_groups": ([metric_row(s, frac_zero_std_groups=1.0 if 2 <= s <= 7 else 0.5) for s in range(1, 10)],
                        "No learning signal", (2, 3, 4, 5, 6, 7)),
    "reward_std": ([{"step": s, "reward_std": 0.0} for s in range(1, 6)], "No learning signal", (1, 2, 3, 4, 5)),
    "skipped": ([metric_row(s, skipped=1.0 if s in (4, 9) else 0.0, loss=None) for s in range(1, 10)],
                "Skipped steps", (4, 9)),
    # entropy 0.5 at steps 1-4, then rising to 3.0: past the band's top (2.0) at steps 6-8 (2.0 itself: inside)
    "entropy_noise": ([metric_row(s, entropy=e) for s, e in enumerate((0.5, 0.5, 0.5, 0.5, 2.0, 2.2, 2.6, 3.0), 1)],
                      "Entropy out of band", (6, 7, 8)),
    "entropy_collapse": ([metric_row(s, entropy=0.01 if s >= 3 else 0.4) for s in range(1, 8)],
                         "Entropy out of band", (3, 4, 5, 6, 7)),
    "one_template": ([metric_row(s, answer_templates={"a + b + c": 0.9 if s >= 2 else 0.5, "<rest>": 0.1})
                      for s in range(1, 8)], "Answer template dominates", (2, 3, 4, 5, 6, 7)),
}


@pytest.mark.parametrize("name", sorted(WARNING_RUNS))
def test_each_warning(tmp_path, name):
    rows, title, steps = WARNING_RUNS[name]
    d = _metrics(tmp_path / name, rows)
    got = {w.title: w.steps for w in warnings(load_run(d))}
    assert got == {title: steps}
    text = page(d)
    assert f"<b>{title}</b> at steps " in text


def test_repetition_and_sample_only_signals(tmp_path):
    d = _metrics(tmp_path / "rep", [{"step": s} for s in range(1, 7)])
    loop = "<think>\n12 + 5 = 17\n12 + 5 = 17\n\n12 + 5 = 17\n</think>"
    rows = [sample_row(s, grp, loop if s == 3 and i < 3 else PLAIN, 0.1) for s in range(1, 7) for grp in range(2)
            for i in range(4)]  # every group's rewards equal at every step, seen only in the samples
    write_jsonl(d / "train_samples.jsonl", rows)
    got = {w.title: w.steps for w in warnings(load_run(d))}
    assert got == {"Repetition": (3,), "No learning signal": (1, 2, 3, 4, 5, 6)}


def test_short_stretches_do_not_warn(tmp_path):
    rows = [metric_row(s, frac_zero_std_groups=1.0 if s <= 4 else 0.0, truncated_frac=1.0 if s >= 7 else 0.0,
                       answer_templates={"a + b + c": 0.9 if s <= 4 else 0.3, "<no answer>": 0.95 if s > 4 else 0})
            for s in range(1, 11)]  # a template for 4 steps, "<no answer>" is not a shape: no warning
    assert warnings(load_run(_metrics(tmp_path / "ok", rows))) == []
    assert warnings(load_run(new_run(tmp_path / "healthy"))) == []


def test_cut_off_last_line_is_skipped_and_reported(tmp_path):
    d = new_run(tmp_path / "run", steps=4)
    write_jsonl(d / "metrics.jsonl", [metric_row(s) for s in range(1, 4)], tail='{"step": 4, "reward_me')
    run = load_run(d)
    assert [m["step"] for m in run.metrics] == [1, 2, 3]
    assert any("metrics.jsonl: skipped unreadable line 4 (the last line is cut off" in n for n in run.notes)
    text = build(d)
    check_html(text)
    assert "the last line is cut off" in text


def test_resumed_run_keeps_the_later_lines(tmp_path):
    rows = [metric_row(s) for s in (1, 2, 3)] + [metric_row(3, reward_mean=0.9), metric_row(4)]
    run = load_run(_metrics(tmp_path / "r", rows))
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4] and run.metrics[2]["reward_mean"] == 0.9
    assert any("step 3 written more than once" in n for n in run.notes)


def test_no_metrics_and_empty_dir(tmp_path):
    d = new_run(tmp_path / "samples_only", steps=3)
    (d / "metrics.jsonl").unlink()
    text = build(d)
    check_html(text)
    assert "No training metrics yet" in text and "metrics.jsonl: not found" in text
    assert "step 5" not in text and "Steps 1, 2, 3 of 3 with stored training completions" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of a run's files"):  # no page written into a wrong dir
        build(empty)
    assert list(empty.iterdir()) == []
    text = report.render(load_run(empty), None, "now")
    check_html(text)
    for name in ("metrics.jsonl", "eval.jsonl", "train_samples.jsonl", "eval_samples.jsonl"):
        assert f"{name}: not found" in text
    assert "No training samples stored" in text and "No eval points recorded" in text


def test_missing_keys_and_wrong_types_do_not_crash(tmp_path):
    rows = [{"step": 1}, {"reward_mean": "n/a", "kl": None, "level": 3},
            {"step": 3, "completion_len_mean": float("nan")}, {"step": 4, "solved_frac": True}]
    d = _metrics(tmp_path / "odd", rows)
    (d / "eval.jsonl").write_text('{"step": 2, "solved_by_level": [1, 2]}\n[1, 2]\n"x"\n')
    write_jsonl(d / "train_samples.jsonl", [{"completion": "no step"}, {"step": 2, "nums": "x", "reward": "y"}])
    check_html(build(d))
    # damaged lines: nesting beyond Python's stack is a skipped line, a lone surrogate is replaced, a "$" is text
    with (d / "eval.jsonl").open("a") as f:
        f.write("[" * 100_000 + "\n")
        f.write(json.dumps({"step": 4, "solved_by_level": {"a$b": 0.5, "$x": 0.25}}) + "\n")
    write_jsonl(d / "eval_samples.jsonl", [{"step": 2, "completion": "\ud800 bad", "solved": False, "reward": 0}])
    assert "eval.jsonl: skipped unreadable lines 2–4" in load_run(d).notes  # [1, 2], "x", the nesting
    check_html(build(d))


def test_without_matplotlib(tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = build(new_run(tmp_path / "run", steps=3))
    parser = check_html(text)
    assert not parser.images and "matplotlib is not installed" in text


def test_cli_writes_report_and_rejects_missing_dir(tmp_path):
    d = new_run(tmp_path / "run", steps=3)
    res = run_tool("report", "--run_dir", str(d))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(d / "report.html") and (d / "report.html").is_file()
    res = run_tool("report", "--run_dir", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: --run_dir: no such directory {tmp_path / 'nope'}"]
    res = run_tool("report")
    assert res.returncode == 2 and res.stderr.strip() == "error: --run_dir is required"


def test_out_that_is_not_an_html_file_is_refused_before_anything_is_written(tmp_path):
    """A run's own files (metrics, the exported config) used to be overwritten with HTML, and a directory left a
    stray `<dir>.tmp`: each is now one line naming --out, exit 2, every file as it was and nothing new written."""
    d = new_run(tmp_path / "run", steps=3)
    (d / "final_hf").mkdir()
    (d / "final_hf" / "config.json").write_text('{"model_type": "gemma3_text"}')
    (tmp_path / "dir.html").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    html = "a file name ending in .html, .htm"
    cases = [(d / "metrics.jsonl", f"expected {html}, got {d / 'metrics.jsonl'}"),
             (d / "final_hf" / "config.json", f"expected {html}, got {d / 'final_hf' / 'config.json'}"),
             (tmp_path, f"{tmp_path} is a directory (expected {html})"),
             (tmp_path / "dir.html", f"{tmp_path / 'dir.html'} is a directory (expected {html})"),
             (tmp_path / "no" / "r.html", f"no such directory {tmp_path / 'no'}"),
             (Path("/proc/r.html"), "cannot write into /proc (")]
    for out, message in cases:
        res = run_tool("report", "--run_dir", str(d), "--out", str(out))
        assert res.returncode == 2 and res.stderr.startswith(f"error: --out: {message}"), (out, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    res = run_tool("report", "--run_dir", str(d), "--out", str(tmp_path / "R.HTM"))  # either suffix, any case
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "R.HTM"), res.stderr


def test_a_failed_write_keeps_the_old_file(tmp_path):
    """write_whole: the old file stays as it was and no temporary file is left when the write fails midway."""
    out = tmp_path / "report.html"
    out.write_text("the old report")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half a page")
        raise OSError(28, "No space left on device")

    with pytest.raises(report.OutError, match=f"^cannot write {re.escape(str(out))} \\(No space left on device\\)$"):
        report.write_whole(out, half_then_fail)
    assert out.read_text() == "the old report" and sorted(tmp_path.iterdir()) == [out]


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (apt-get install -y chromium)")
def test_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib", reason="the curves need the plot extra (CI installs it)")
    from PIL import Image

    d = new_run(tmp_path / "run")
    url = (d / "report.html").resolve().as_uri()
    build(d)
    with tempfile.TemporaryDirectory() as profile:
        shot = tmp_path / "shot.png"
        res = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                              "--window-size=1280,2400", url], capture_output=True, text=True, timeout=120)
        assert shot.is_file(), res.stderr[-2000:]
        dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    for err in (res.stderr, dom.stderr):
        assert not re.search(r"Uncaught|ERROR:CONSOLE|Not allowed to load", err), err[-2000:]
    assert "<h1>GRPO run report: run</h1>" in dom.stdout and dom.stdout.count("<figure") == 13
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the page rendered (nearly) blank"
    white = max(c for c in colours if c[1] == (255, 255, 255))[0] if (255, 255, 255) in {c[1] for c in colours} else 0
    assert white < 0.97 * image.size[0] * image.size[1]


def test_entropy_warning_wording_and_tolerance(tmp_path):
    """entropy_warnings over the metrics rows: noise above ENTROPY_BAND and collapse below it are separate warnings
    with their own wording (both sides in one run: two warnings, each naming only its steps); the band's ends are
    inside; a run without entropy, or with null / NaN / string entropy, has no entropy warning at all."""
    from grpo.entropy_control import ENTROPY_BAND
    from grpo.report import entropy_warnings

    low, high = ENTROPY_BAND
    values = (1.0, 3.0, high, 2.5, low, 0.01, 0.01, 0.01, 0.01, 0.01, 0.5)
    run = load_run(_metrics(tmp_path / "both", [metric_row(s, entropy=e) for s, e in enumerate(values, 1)]))
    noise, collapse = entropy_warnings(run.metrics)
    assert (noise.title, noise.steps) == ("Entropy out of band", (2, 4))
    assert "noise" in noise.detail and "collapse" not in noise.detail and "peak 3" in noise.detail
    assert (collapse.title, collapse.steps) == ("Entropy out of band", (6, 7, 8, 9, 10))
    assert "collapse" in collapse.detail and "noise" not in collapse.detail and "lowest 0.01" in collapse.detail
    text = page(run.run_dir)
    assert text.count("<b>Entropy out of band</b>") == 2 and "entropy collapse, near-deterministic" in text

    no_key = [{k: v for k, v in metric_row(s).items() if k != "entropy"} for s in range(1, 8)]
    assert entropy_warnings(load_run(_metrics(tmp_path / "none", no_key)).metrics) == []
    odd = [metric_row(1, entropy=None), metric_row(2, entropy=float("nan")), metric_row(3, entropy="3.0")]
    assert entropy_warnings(load_run(_metrics(tmp_path / "odd", odd)).metrics) == []


@pytest.mark.parametrize("dominated, want", [(6, (2, 3, 4, 5, 6, 7)), (4, ())])
def test_answer_template_dominates(tmp_path, dominated, want):
    """'a + b + c' at 0.85 of the completions in `dominated` consecutive steps (from step 2; 0.5 before and after):
    6 steps warn naming the template and exactly those steps, 4 (under STUCK_STEPS = 5) do not. A special key at
    0.95 ('<no answer>', at steps 9-14) is never a dominating shape."""
    rows = [metric_row(s, answer_templates={"a + b + c": 0.85 if 2 <= s < 2 + dominated else 0.5, "a * b": 0.05,
                                            "<no answer>": 0.95 if s > 8 else 0.1}) for s in range(1, 15)]
    run = load_run(_metrics(tmp_path / "t", rows))
    got = [w for w in warnings(run) if w.title == "Answer template dominates"]
    assert [w.steps for w in got] == ([want] if want else [])
    if want:
        assert "'a + b + c'" in got[0].detail
        assert "<b>Answer template dominates</b> at steps 2\u20137: one answer shape, &#x27;a + b + c&#x27;" in page(
            run.run_dir)


def test_entropy_and_signal_curves_and_the_template_table(tmp_path):
    """The new keys reach the report: the template table names the picked steps' top shapes with their shares,
    and chart_specs (what both bin/report and bin/plot draw) holds the recorded values: entropy with the band as
    its decoration, both zero-std curves on one 0..1 chart, the applied entropy coefficient, the oversample ratio
    and one level-share line per level (0 where a step drew none of it)."""
    from grpo.entropy_control import ENTROPY_BAND
    from grpo.report import template_table

    rows = [metric_row(s, entropy=0.2 * s, frac_zero_std_groups=0.5, frac_zero_std_solved=1.0 - 0.1 * s,
                       oversample_ratio=1.0 + s, entropy_coef_applied=0.005 * (s > 3),
                       level_shares={"3 numbers": 1.0} if s <= 2 else {"3 numbers": 0.25, "4 numbers": 0.75},
                       answer_templates={"a + b": 0.75, "a * b": 0.2, "<rest>": 0.04, "b - a": 0.01})
            for s in range(1, 6)]
    d = _metrics(tmp_path / "new_keys", rows)
    run = load_run(d)
    assert template_table(run.metrics, [1, 5]) == [(1, [("a + b", 0.75), ("a * b", 0.2), ("<rest>", 0.04)]),
                                                   (5, [("a + b", 0.75), ("a * b", 0.2), ("<rest>", 0.04)])]
    specs = {c.id: c for c in report.chart_specs(run)}
    values = lambda cid: {ln.label: ln.ys for ln in specs[cid].lines}
    assert specs["entropy"].band == ENTROPY_BAND
    assert values("entropy")["train"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(c.band is None for cid, c in specs.items() if cid != "entropy")
    assert specs["zero_std"].share and values("zero_std")["rewards all equal"] == [0.5] * 5
    assert values("zero_std")["solved outcomes all equal"] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert values("oversample") == {"ratio": [2.0, 3.0, 4.0, 5.0, 6.0]}
    assert values("entropy_coef") == {"coefficient": [0.0, 0.0, 0.0, 0.005, 0.005]}
    assert values("level_shares") == {"3 numbers": [1.0, 1.0, 0.25, 0.25, 0.25], "4 numbers": [0, 0, 0.75, 0.75, 0.75]}
    assert specs["level_shares"].lines[1].xs == [1, 2, 3, 4, 5]
    text = page(d)
    assert "<h2>Answer templates</h2>" in text
    assert "<tr><td>5</td><td>a + b: 0.75, a * b: 0.2, &lt;rest&gt;: 0.04</td></tr>" in text


def test_no_new_keys_no_new_charts(tmp_path):
    """An old run (none of the new keys) draws none of their charts and shows no template table."""
    run = load_run(old_run(tmp_path / "old"))
    ids = {c.id for c in report.chart_specs(run)}
    assert not ids & {"entropy_coef", "zero_std", "oversample", "level_shares", "level"}, ids
    assert "entropy" in ids and "Answer templates" not in page(run.run_dir)


def test_eval_drops_and_the_best_step(tmp_path):
    """An eval format falling from 1.0 to 0.5 (more than the guard's 0.3 drop) at steps 20 and 30, and a held-out
    solved rate from 0.6 to 0.2 on one of two levels at step 30: both warnings name exactly those steps; the best
    eval (step 10, the first strictly best score) is marked on the curves and shown next to the last on the
    cards."""
    from grpo.report import best_eval

    d = _metrics(tmp_path / "drop", [metric_row(s) for s in range(1, 31)])
    evals = [{"step": s, "eval_solved_frac": 0.0, "eval_format_frac": f, "eval_reward_mean": 0.1,
              "solved_by_level": {"easy": v, "top": 0.0}, "format_by_level": {"easy": f, "top": f}}
             for s, f, v in ((0, 0.2, 0.1), (10, 1.0, 0.6), (20, 0.5, 0.6), (30, 0.5, 0.2))]
    write_jsonl(d / "eval.jsonl", evals)
    run = load_run(d)
    got = {w.title: w.steps for w in warnings(run)}
    assert got == {"Eval format collapsed": (20, 30), "Held-out score fell": (30,)}
    assert best_eval(run.evals)["step"] == 10
    text = page(d)
    assert "eval solved, top level, best eval (step 10)" in text and "eval solved, top level, last (step 30)" in text
    drawn = [c.best_step for c in report.chart_specs(run)]
    assert drawn and set(drawn) == {10}  # every chart marks the best step


def test_the_run_config_is_shown(tmp_path):
    """Reference: the run_config.json the loop writes (grpo/run_files.py): its top-level keys become the report's
    config table; a damaged one is left out with a note."""
    run = new_run(tmp_path / "run")
    (run / "run_config.json").write_text(json.dumps({"grpo": {"learning_rate": 1e-5}, "lora": None}))
    text = build(run)
    assert "<td>grpo</td><td>{&quot;learning_rate&quot;: 1e-05}</td>" in text and "<td>lora</td><td>null</td>" in text
    (run / "run_config.json").write_text("{not json")
    assert "run_config.json: not readable JSON, left out" in build(run)


def test_eval_browser_keeps_each_levels_puzzles_apart(tmp_path):
    """The eval numbers its groups per level (each level's held-out puzzles from 0): one heading per puzzle,
    with that puzzle's completion under it (a heading took six levels' group-0 completions as its own)."""
    from grpo.report.analysis import groups_of
    from grpo.report.reading import parse_sample

    rows = [{"step": 0, "group": g, "nums": [lv, g + 1], "target": 10 * lv + g, "completion": f"c{lv}{g}",
             "reward": 0.1, "solved": False, "level": f"L{lv}"} for lv in (1, 2, 3) for g in range(2)]
    groups = groups_of([parse_sample(r) for r in rows])
    assert [[s.completion for s in g] for g in groups] == [["c10"], ["c11"], ["c20"], ["c21"], ["c30"], ["c31"]]
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "eval_samples.jsonl", rows)
    text = page(run)
    assert text.count("1/1 solved") + text.count("0/1 solved") == 6 and "0/3 solved" not in text
