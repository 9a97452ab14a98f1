"""The report's page: one self-contained HTML file (inline CSS, images as base64 data URIs, no script), so it
opens from disk in any browser, can be mailed or attached to an issue, and needs no server.

All model text is HTML-escaped: a completion is arbitrary text. Browsing uses <details>/<summary>, not JS.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import re
from pathlib import Path

from grpo.report.analysis import (
    SPECIAL_TEMPLATES,
    aha_shares,
    aha_verdict,
    best_eval,
    by_step_samples,
    first_aha,
    groups_of,
    pick_steps,
    template_table,
    warnings,
)
from grpo.report.charts import Chart, make_charts, pyplot
from grpo.report.output import HTML, check_out, write_whole
from grpo.report.reading import RUN_CONFIG, Run, Sample, format_steps, load_run, number
from grpo.rollout import AHA_PHRASES, has_aha
from grpo.run_files import JSONL_FILES, STATUS_FILE

# One pattern for all phrases, longest first, so "let me verify" is marked whole rather than just "verify";
# word boundaries and case-insensitivity as grpo.rollout counts them.
AHA_RE = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(AHA_PHRASES, key=len, reverse=True)) + r")\b",
                    re.IGNORECASE)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1320px;padding:16px 24px;
color:#1d2330;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#667;margin:0 0 12px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #dde;border-radius:6px;padding:8px 12px;min-width:120px;background:#f8f9fc}
.card b{display:block;font-size:18px}.card span{color:#667;font-size:12px}
.warn{border-left:5px solid #e09b00;background:#fff7e6;padding:8px 12px;margin:8px 0;border-radius:4px}
.ok{border-left:5px solid #2e9d4f;background:#eef9f1;padding:8px 12px;border-radius:4px}
.note{border-left:5px solid #99a;background:#f4f5f8;padding:6px 12px;margin:6px 0;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:12px}
figure{margin:0;border:1px solid #e3e5ee;border-radius:6px;padding:4px;background:#fff}
figure img{width:100%;height:auto;display:block}figcaption{font-size:12px;color:#667;text-align:center}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #dde;padding:3px 8px;text-align:right}
th{background:#f0f2f7}td:first-child,th:first-child{text-align:left}
details{margin:4px 0}summary{cursor:pointer;padding:3px 0}details.step>summary{font-weight:600;font-size:15px}
details.group{margin-left:18px}.c{border-left:4px solid #c9ccd6;margin:6px 0 6px 18px;padding:2px 10px;
background:#fafbfd}.c.solved{border-left-color:#2e9d4f;background:#f1faf3}
.meta{font-size:12px;color:#556}.meta b{color:#2e9d4f}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace}
mark{background:#ffe066;padding:0 1px;border-radius:2px}
"""
DOT, DASH = " \u00b7 ", "\u2013"


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def marked(text: str) -> str:
    """text, escaped, with every verification phrase in <mark>."""
    out, pos = [], 0
    for m in AHA_RE.finditer(text):
        out += [esc(text[pos:m.start()]), f"<mark>{esc(m.group(0))}</mark>"]
        pos = m.end()
    return "".join(out) + esc(text[pos:])


def fmt(x, digits: int = 3) -> str:
    v = number(x)
    return DASH if v is None else f"{v:.{digits}f}".rstrip("0").rstrip(".") if v % 1 else str(int(v))


def img(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return (f'<figure id="curve-{esc(chart.id)}"><img alt="{esc(chart.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(chart.keys or chart.title)}</figcaption></figure>")


def table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def completion(s: Sample, label: str = "") -> str:
    """One completion: its reward, flags and the text with the phrases marked; solved ones in green."""
    bits = [label] * bool(label) + [f"reward {fmt(s.reward)}", "<b>solved</b>" if s.solved else "not solved"]
    bits += ["format ok" if s.format else "bad format"] if s.format is not None else []
    bits += [f"{s.length} tokens"] if s.length is not None else []
    bits += ["truncated"] if s.truncated else []
    bits += [f"level {esc(s.level)}"] if s.level else []
    bits += ["verification phrase"] if has_aha(s.own) else []
    return (f'<div class="c{" solved" * s.solved}"><div class="meta">{DOT.join(bits)}</div>'
            f"<pre>{marked(s.completion)}</pre></div>")


def group_block(group: list[Sample], open_: bool) -> str:
    solved = sum(s.solved for s in group)
    rewards = " ".join(fmt(s.reward, 2) for s in group)
    body = "".join(completion(s, f"#{i + 1}") for i, s in enumerate(group))
    return (f'<details class="group"{" open" * open_}><summary>{esc(group[0].prompt)} \u00b7 {solved}/{len(group)}'
            f" solved \u00b7 rewards {rewards}</summary>{body}</details>")


def browser(samples: list[Sample], what: str, k: int) -> str:
    """The chosen steps (first, last, evenly spaced), each a <details> of its prompt groups."""
    per_step = by_step_samples(samples)
    if not per_step:
        return f'<p class="note">No {what} samples stored.</p>'
    chosen = pick_steps(per_step, k)
    out = [f"<p>Steps {esc(', '.join(map(str, chosen)))} of {len(per_step)} with stored {what} completions "
           "(highlighted: verification phrases; green: solved).</p>"]
    for step in chosen:
        rows = per_step[step]
        groups = groups_of(rows)
        n_aha = sum(has_aha(s.own) for s in rows)
        out.append(f'<details class="step"{" open" * (step == chosen[-1])}><summary>Step {step} \u00b7 '
                   f"{len(groups)} prompt{'s' * (len(groups) != 1)} \u00b7 {len(rows)} completions \u00b7 "
                   f"{sum(s.solved for s in rows)} solved \u00b7 {n_aha} with a verification phrase</summary>"
                   + "".join(group_block(g, step == chosen[-1] and i == 0) for i, g in enumerate(groups))
                   + "</details>")
    return "".join(out)


def header(run: Run, built: str) -> str:
    last = run.metrics[-1] if run.metrics else {}
    ev = run.evals[-1] if run.evals else {}
    best = best_eval(run.evals) or {}
    aha = first_aha(run.train_samples)
    cards = [("steps recorded", len(run.metrics)), ("last step", last.get("step", DASH)),
             ("reward (last step)", fmt(last.get("reward_mean"))), ("solved (last step)", fmt(last.get("solved_frac"))),
             ("format (last step)", fmt(last.get("format_frac"))),
             (f"eval solved, top level, last (step {ev.get('step', DASH)})", fmt(ev.get("eval_solved_frac"))),
             (f"eval solved, top level, best eval (step {best.get('step', DASH)})", fmt(best.get("eval_solved_frac"))),
             ("first solved aha among the stored completions", f"step {aha.step}" if aha else "none yet")]
    return (f"<h1>GRPO run report: {esc(run.run_dir.resolve().name)}</h1>"
            f'<p class="sub">{esc(run.run_dir.resolve())} \u00b7 built {esc(built)} from the run\'s files; rebuild '
            f"any time (also while training) with <code>bin/report --run_dir {esc(run.run_dir)}</code></p>"
            '<div class="cards">' + "".join(f"<div class=\"card\"><b>{esc(v)}</b><span>{esc(k)}</span></div>"
                                            for k, v in cards) + "</div>")


def warnings_section(run: Run) -> str:
    ws = warnings(run)
    body = "".join(f'<div class="warn"><b>{esc(w.title)}</b> at step{"s" * (len(w.steps) > 1)} '
                   f"{esc(format_steps(w.steps))}: {esc(w.detail)}.</div>" for w in ws)
    if not body and not run.metrics and not run.train_samples:
        return '<h2>Warnings</h2><p class="note">Nothing to check yet.</p>'
    return "<h2>Warnings</h2>" + (body or '<p class="ok">No warnings: nothing in the files looks like length '
                                  "collapse, budget-pinned answers, repetition, a lost learning signal, entropy "
                                  "out of its band, one answer shape for every puzzle or skipped steps.</p>")


def files_section(run: Run) -> str:
    missing = "" if run.metrics else ('<p class="warn">No training metrics yet (metrics.jsonl is missing or '
                                      "empty): the curves need at least one finished step.</p>")
    notes = "".join(f'<div class="note">{esc(n)}</div>' for n in run.notes)
    return missing + (f"<details open><summary>Files: {len(run.notes)} note{'s' * (len(run.notes) != 1)}</summary>"
                      f"{notes}</details>" if notes else "")


def curves_section(charts: list[Chart] | None, run: Run) -> str:
    if charts is None:
        return ('<h2>Curves</h2><p class="warn">matplotlib is not installed, so the curves are left out: '
                "<code>pip install -e '.[plot]'</code> and rebuild. The tables below hold the numbers.</p>")
    shown = [c for c in charts if c.id not in AHA_CHARTS]
    if not shown:
        return '<h2>Curves</h2><p class="note">Nothing recorded to draw yet.</p>'
    return "<h2>Curves</h2><div class=\"grid\">" + "".join(map(img, shown)) + "</div>"


AHA_CHARTS = ("aha_share", "aha_by_level")  # drawn in the aha section, not with the curves


def aha_section(run: Run, charts: list[Chart] | None) -> str:
    """Verification phrases among solved vs unsolved completions, and the first solved completion with one."""
    out = ["<h2>The aha moment</h2><p>R1-Zero's 'aha': the model starts to check its own work. Below, the share of "
           "completions containing a verification phrase (" + esc(", ".join(AHA_PHRASES)) + ").</p>"]
    out += ['<div class="grid">' + img(c) + "</div>" for c in charts or [] if c.id in AHA_CHARTS]
    verdict = aha_verdict(run.evals)
    if verdict:
        out.append("<p><b>Against the base model</b> (the step-0 eval; OAT-Zero: base models already say these "
                   "phrases, often without solving):</p><ul>" + "".join(f"<li>{esc(v)}</li>" for v in verdict)
                   + "</ul>")
    rows = aha_shares(run.metrics, run.train_samples)
    counts = {m["step"]: m.get("aha_count") for m in run.metrics}
    if rows:
        t = table(["step", "share of solved with a phrase", "share of unsolved with a phrase", "aha_count", "from"],
                  [[s, fmt(a), fmt(b), fmt(counts.get(s)), src] for s, a, b, src in rows])
        out.append(f"<details><summary>Per step ({len(rows)} steps)</summary>{t}</details>")
    for what, samples in (("training", run.train_samples), ("eval", run.eval_samples)):
        s = first_aha(samples)
        out.append(f"<p><b>First solved {what} completion with a verification phrase:</b> step {s.step}, "
                   f"puzzle {esc(s.prompt)}</p>{completion(s)}" if s else
                   f'<p class="note">No solved {what} completion with a verification phrase yet.</p>')
    return "".join(out)


def templates_section(run: Run) -> str:
    """The answer shapes a few steps' completions took (metrics.jsonl answer_templates): a policy that answers
    every puzzle `a + b + c` shows here before anywhere else."""
    recorded = [m["step"] for m in run.metrics if isinstance(m.get("answer_templates"), dict)]
    rows = template_table(run.metrics, pick_steps(recorded))
    if not rows:
        return ""
    body = table(["step", "most common answer shapes: share of the step's completions"],
                 [[s, ", ".join(f"{t}: {fmt(v, 2)}" for t, v in top)] for s, top in rows])
    return ("<h2>Answer templates</h2><p>The given numbers are letters a, b, c, d in the order given; "
            f"{esc(', '.join(SPECIAL_TEMPLATES))} are not shapes. Steps {esc(', '.join(str(s) for s, _ in rows))} of "
            f"{len(recorded)} that recorded answer_templates.</p>" + body)


def evals_section(run: Run) -> str:
    if not run.evals:
        return '<h2>Eval</h2><p class="note">No eval points recorded.</p>'
    rows = [[e["step"], fmt(e.get("eval_solved_frac")), fmt(e.get("eval_format_frac")), fmt(e.get("eval_reward_mean")),
             fmt(e.get("eval_s"), 1), ", ".join(f"{k}: {fmt(v)}" for k, v in e["solved_by_level"].items())
             if isinstance(e.get("solved_by_level"), dict) else ""] for e in run.evals]
    return "<h2>Eval (greedy, held-out)</h2>" + table(["step", "solved", "format", "reward", "seconds", "by level"],
                                                      rows)


def config_section(run: Run) -> str:
    if not run.config:
        return ""
    rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in sorted(run.config.items())]
    return f"<h2>Config</h2><details><summary>{len(rows)} settings</summary>{table(['key', 'value'], rows)}</details>"


def render(run: Run, charts: list[Chart] | None, built: str, browse_steps: int = 6) -> str:
    """The whole page as text; charts None: matplotlib is missing, and the page says so."""
    body = [header(run, built), files_section(run), warnings_section(run), curves_section(charts, run),
            aha_section(run, charts), templates_section(run),
            "<h2>Completions (training)</h2>", browser(run.train_samples, "training", browse_steps),
            "<h2>Completions (eval)</h2>", browser(run.eval_samples, "eval", browse_steps), evals_section(run),
            config_section(run)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Report: '
            f"{esc(run.run_dir.resolve().name)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def build(run_dir: Path, out: Path, browse_steps: int = 6) -> Path:
    """Read run_dir, write the report to out (an .html or .htm name, checked before anything is read; written
    whole: grpo/report/output.py). OutError for an out that cannot be written."""
    check_out(out, HTML)
    if not any((run_dir / name).is_file() for name in (*JSONL_FILES, STATUS_FILE, RUN_CONFIG)):  # a page of nothing
        raise FileNotFoundError(f"{run_dir} holds none of a run's files ({', '.join(JSONL_FILES)}, {STATUS_FILE}, "
                                f"{RUN_CONFIG}) yet: expected a bin/train --output_dir")
    run = load_run(run_dir)
    plt = pyplot()
    charts = make_charts(plt, run) if plt is not None else None
    built = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    text = render(run, charts, built, browse_steps)
    # errors="replace": a damaged JSON line can hold a lone surrogate (\ud800) that UTF-8 cannot encode
    return write_whole(out, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="replace"))
