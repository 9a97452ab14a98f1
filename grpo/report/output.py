"""Where bin/report and bin/plot write: the path checked before the run is read, the file written whole or not at all.

An output path is easy to get wrong in ways that cost data or end in a traceback: a run's own file
(`--out run/metrics.jsonl` would replace the metrics with HTML), a directory, a folder that takes no new file.
check_out refuses each before any work, saying what it expected; write_whole writes a temporary file beside the
target and renames it over, so a reader (a browser reloading a live run's page) never sees half a file, and a
failed write leaves the old file as it was and no temporary one behind.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

HTML = ("html", "htm")


class OutError(ValueError):
    """The output path cannot be written; the message says why (bin/ adds the flag's name)."""


def image_formats() -> list[str]:
    """The suffixes matplotlib's savefig writes (png, pdf, svg, ...), asked rather than listed, so the list is the
    installed matplotlib's."""
    from matplotlib.backend_bases import FigureCanvasBase

    return list(FigureCanvasBase.get_supported_filetypes())


def check_out(out: Path, formats: Collection[str]) -> Path:
    """out, if it may be written: a file name ending in one of formats (lower case, no dot), not a directory, in a
    folder that takes a new file. OutError saying which it is not."""
    expected = "a file name ending in " + ", ".join(f".{f}" for f in formats)
    if out.is_dir():
        raise OutError(f"{out} is a directory (expected {expected})")
    if out.suffix.lower().lstrip(".") not in formats:
        raise OutError(f"expected {expected}, got {out}")
    if not out.parent.is_dir():
        raise OutError(f"no such directory {out.parent}")
    try:
        with tempfile.TemporaryFile(dir=out.parent):  # a probe, as permissions and read-only mounts both refuse
            pass
    except OSError as e:
        raise OutError(f"cannot write into {out.parent} ({e.strerror or e})") from None
    return out


def write_whole(out: Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) for a temporary name beside out, then that file renamed to out; OutError when either fails."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(out)
    except (OSError, RuntimeError) as e:  # RuntimeError: matplotlib lacks a program a format needs (pgf: LaTeX)
        raise OutError(f"cannot write {out} ({getattr(e, 'strerror', None) or e})") from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; a directory of that name is not ours to remove
            tmp.unlink(missing_ok=True)
    return out
