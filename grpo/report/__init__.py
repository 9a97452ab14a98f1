"""A run's report, rebuilt from the files a run writes (grpo/run_files.py) at any time, also while it is running.

    reading.py   the files as plain data (Run, Sample); tolerant: what is missing or cut off is noted, not fatal
    analysis.py  what the report says about them: warnings naming their steps, the aha evidence, the best eval
    charts.py    chart_specs, the one list of curves; drawn per chart for the page, or as one figure (bin/plot)
    page.py      the self-contained HTML page (bin/report)
    output.py    where bin/report and bin/plot write: the path checked first, the file written whole

Nothing here defines flags: bin/report and bin/plot turn theirs into a call of build or plot_curves.
"""

from grpo.report.analysis import (
    Warn,
    aha_shares,
    best_eval,
    entropy_warnings,
    eval_drop_warnings,
    first_aha,
    template_table,
    warnings,
)
from grpo.report.charts import (
    Chart,
    ChartSpec,
    Line,
    chart_specs,
    draw_on,
    grid_figure,
    grid_size,
    make_charts,
    plot_curves,
    pyplot,
)
from grpo.report.output import HTML, OutError, check_out, image_formats, write_whole
from grpo.report.page import build, render
from grpo.report.reading import Run, Sample, load_curves, load_run, read_jsonl

__all__ = [
    "HTML", "Chart", "ChartSpec", "Line", "OutError", "Run", "Sample", "Warn", "aha_shares", "best_eval", "build",
    "chart_specs", "check_out", "draw_on", "entropy_warnings", "eval_drop_warnings", "first_aha", "grid_figure",
    "grid_size", "image_formats", "load_curves", "load_run", "make_charts", "plot_curves", "pyplot", "read_jsonl",
    "render", "template_table", "warnings", "write_whole",
]
