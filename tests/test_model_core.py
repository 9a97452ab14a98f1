"""Config parsing, init, checkpoint save/load round trips and the loader's error messages.

References: the released models' config.json values (transformers' Gemma2Config / Gemma3TextConfig,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/configuration_gemma3.py,
and e.g. https://huggingface.co/google/gemma-2-27b: 46 layers, D 4608, 32 heads, 16 kv heads, head_dim 128,
query_pre_attn_scalar 144 = D / N); save -> load must be bitwise identical, and what we save must be a
safetensors file the library itself reads (`safetensors.safe_open`).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import model
from model.config import GLOBAL, SLIDING, config_from_hf, config_to_hf


def _hf_gemma2(**kw):
    base = {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 10000.0,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
    }
    base.update(kw)
    return base


def test_presets_match_spec_table():
    c = model.get_preset("gemma2-27b")
    assert (c.num_layers, c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim) == (46, 4608, 32, 16, 128)
    assert c.query_pre_attn_scalar == 144  # 27B scales by D / N, not head_dim
    c = model.get_preset("gemma3-270m")
    assert (c.num_layers, c.embed_dim, c.hidden_dim, c.vocab_size, c.sliding_window) == (18, 640, 2048, 262144, 512)
    assert [i for i, t in enumerate(c.layer_types) if t == GLOBAL] == [5, 11, 17]
    assert model.get_preset("gemma2-2b").layer_types[:2] == (SLIDING, GLOBAL)  # even layers slide
    # 270M parameter count: ~268M (170M of it the 262k x 640 embedding).
    assert 260e6 < c.num_params() < 275e6
    with pytest.raises(ValueError, match="unknown preset"):
        model.get_preset("gemma9")


def test_config_from_hf_matches_preset_both_key_styles():
    want = model.get_preset("gemma2-2b")
    assert config_from_hf(_hf_gemma2()) == want  # 4.x: rope_theta, no layer_types
    v5 = _hf_gemma2(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    layer_types=list(want.layer_types))
    del v5["rope_theta"]
    assert config_from_hf(v5) == want


def test_gemma3_rope_parameters_per_layer_type():
    hf = {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    }
    assert config_from_hf(hf) == model.get_preset("gemma3-4b")
    old = dict(hf, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    del old["rope_parameters"]
    assert config_from_hf(old) == model.get_preset("gemma3-4b")
    wrapped = {"model_type": "gemma3", "text_config": hf}  # multimodal config.json
    assert config_from_hf(wrapped) == model.get_preset("gemma3-4b")


def test_missing_keys_mean_what_they_mean_to_transformers():
    # Gemma 2 without its soft-cap keys has transformers' caps (it was loaded with none: wrong logits, no error);
    # an explicit null still means no cap
    hf = {k: v for k, v in _hf_gemma2().items() if not k.endswith("softcapping") and k != "head_dim"}
    assert config_from_hf(hf) == model.get_preset("gemma2-2b")
    assert config_from_hf(_hf_gemma2(attn_logit_softcapping=None)).attn_softcap is None
    # the released Gemma 3 4B config.json's text_config lists only what differs from transformers' defaults
    short = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
             "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    assert config_from_hf({"model_type": "gemma3", "text_config": short}) == model.get_preset("gemma3-4b")


def test_config_round_trips_through_hf_json():
    for cfg in (model.get_preset("gemma2-27b"), model.get_preset("gemma3-4b"), model.tiny_config("gemma3")):
        assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        config_from_hf({k: v for k, v in _hf_gemma2().items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="untied lm_head"):
        config_from_hf(_hf_gemma2(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        config_from_hf([1, 2])
    for bad in ([2304], "abc"):  # a TypeError / a bare int() ValueError before
        with pytest.raises(ValueError, match=r"^config.json: "):
            config_from_hf(_hf_gemma2(hidden_size=bad))
    with pytest.raises(ValueError, match=r"^config.json: "):  # an AttributeError traceback before
        config_from_hf(_hf_gemma2(rope_scaling=[8.0]))
    with pytest.raises(ValueError, match="text_config must be a JSON object, got list"):
        config_from_hf({"model_type": "gemma3", "text_config": [1]})
    with pytest.raises(ValueError, match="num_kv_heads 0"):
        config_from_hf(_hf_gemma2(num_key_value_heads=0))
    yarn = {"full_attention": {"rope_type": "yarn", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):  # was read as no scaling
        config_from_hf(_hf_gemma2(model_type="gemma3_text", rope_parameters=yarn))


def test_a_run_directory_given_as_a_model_points_at_its_exports(tmp_path):
    (tmp_path / "status.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="its models are the run's final_hf/ and best_hf/"):
        model.load_config(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json$"):  # any other directory: no hint
        model.load_config(tmp_path / "elsewhere")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_init_params_follows_schema(arch):
    cfg = model.tiny_config(arch)
    params = model.init_params(jax.random.key(0), cfg)
    shapes = jax.tree.map(lambda s: s.shape, model.abstract_params(cfg))
    assert jax.tree.map(lambda x: x.shape, params) == shapes
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.num_params()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    cfg = model.tiny_config("gemma3")
    params = model.init_params(jax.random.key(1), cfg, dtype=dtype)
    model.save_hf_checkpoint(tmp_path, cfg, params)
    cfg2, params2 = model.load_hf_checkpoint(tmp_path, dtype=dtype)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    assert all(x.dtype == dtype for x in jax.tree.leaves(params2))


def test_saved_file_uses_hf_names_and_layout(tmp_path):
    cfg = model.tiny_config("gemma2")
    params = model.init_params(jax.random.key(2), cfg)
    model.save_hf_checkpoint(tmp_path, cfg, params)
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    t = load_file(tmp_path / "model.safetensors")
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.embed_dim
    q1 = t["model.layers.1.self_attn.q_proj.weight"]
    assert q1.shape == (n * h, d)  # PyTorch Linear: [out, in], rows head-major
    np.testing.assert_array_equal(q1[h * 2 + 3], np.asarray(params["layers"]["q"][1, :, 2, 3]))
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (d, n * h)
    assert len(t) == 2 + cfg.num_layers * 11


def test_load_places_leaves_on_given_shardings(tmp_path):
    cfg = model.tiny_config("gemma2")
    model.save_hf_checkpoint(tmp_path, cfg, model.init_params(jax.random.key(3), cfg))
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda s: spec if s.shape[-1] % 8 == 0 and len(s.shape) == 2 else rep,
                             model.abstract_params(cfg))
    _, params = model.load_hf_checkpoint(tmp_path, shardings=shardings)
    assert params["embed"].sharding == spec
    assert params["layers"]["q"].sharding == rep


@pytest.fixture
def saved(tmp_path):
    cfg = model.tiny_config("gemma2")
    model.save_hf_checkpoint(tmp_path / "ckpt", cfg, model.init_params(jax.random.key(4), cfg))
    return tmp_path / "ckpt"


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    t = load_file(path / "model.safetensors")
    edit(t)
    save_file(t, path / "model.safetensors")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        model.load_hf_checkpoint(tmp_path / "nope")


def test_missing_and_unexpected_tensors_are_listed(saved):
    def edit(t):
        del t["model.layers.2.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.bogus.weight"] = np.zeros(3, np.float32)

    _rewrite(saved, edit)
    with pytest.raises(ValueError) as e:
        model.load_hf_checkpoint(saved)
    assert "missing tensors: model.layers.2.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.0.self_attn.bogus.weight" in str(e.value)


def test_wrong_shape_is_named(saved):
    _rewrite(saved, lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shapes: model.norm.weight: got \[7\], expected \[64\]"):
        model.load_hf_checkpoint(saved)


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        model.load_hf_checkpoint(saved)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_safetensors(saved, keep):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])
    with pytest.raises(ValueError, match="truncated") as e:
        model.load_hf_checkpoint(saved)
    assert str(f) in str(e.value) and "\n" not in str(e.value)  # one line naming the file


def test_integer_tensor_is_refused(saved):
    _rewrite(saved, lambda t: t.update({"model.norm.weight": np.zeros(64, np.int8)}))
    with pytest.raises(ValueError, match="unsupported dtypes: model.norm.weight: I8"):
        model.load_hf_checkpoint(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model.load_hf_checkpoint(saved)


def test_sharded_index_and_multimodal_prefix(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    t = load_file(saved / "model.safetensors")
    out = tmp_path / "mm"
    shutil.copytree(saved, out)
    (out / "model.safetensors").unlink()
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
    renamed["model.vision_tower.patch.weight"] = np.zeros(2, np.float32)  # ignored: not the text tower
    names = sorted(renamed)
    half = len(names) // 2
    save_file({k: renamed[k] for k in names[:half]}, out / "model-00001-of-00002.safetensors")
    save_file({k: renamed[k] for k in names[half:]}, out / "model-00002-of-00002.safetensors")
    index = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
             for i, k in enumerate(names)}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    _, a = model.load_hf_checkpoint(saved)
    _, b = model.load_hf_checkpoint(out)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    for bad in ('{"weight_map": [1]}', '{"metadata": {}}', "{oops"):  # a KeyError / TypeError traceback before
        (out / "model.safetensors.index.json").write_text(bad)
        with pytest.raises(ValueError, match="not a safetensors index"):
            model.load_hf_checkpoint(out)


def test_sharded_save_round_trip_and_resave(tmp_path):
    # Above max_shard_bytes the saver writes transformers' sharded layout; re-saving smaller removes the shards.
    from safetensors import safe_open

    cfg = model.tiny_config("gemma3")
    params = model.init_params(jax.random.key(6), cfg, dtype=jnp.bfloat16)
    model.save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree.leaves(params))
    for name in files:
        with safe_open(tmp_path / name, framework="numpy") as f:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())
    _, params2 = model.load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    model.save_hf_checkpoint(tmp_path, cfg, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _, params3 = model.load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params3)


def test_bf16_file_loads_as_f32(saved):
    _rewrite(saved, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    _, params = model.load_hf_checkpoint(saved, dtype=jnp.float32)
    assert params["embed"].dtype == jnp.float32


def test_forward_rejects_bad_shapes():
    cfg = model.tiny_config("gemma2")
    params = model.init_params(jax.random.key(5), cfg)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        model.forward(params, jnp.zeros((5,), jnp.int32), cfg)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.forward(params, jnp.zeros((2, 5), jnp.int32), cfg, attention_mask=jnp.ones((2, 4)))


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("btd,df->btf", (2, 3, 4), (4, 5)),  # gate / up / down
    ("btd,dnh->btnh", (2, 3, 4), (4, 2, 3)),  # q / k / v
    ("btnh,nhd->btd", (2, 3, 2, 3), (2, 3, 4)),  # o: two contracted dims
])
def test_dense_and_its_custom_backward_match_einsum(equation, x_shape, w_shape):
    """model.forward.dense (the projections' matmul, with a hand-written backward) against jnp.einsum and
    autodiff: values and both gradients to float32 rounding (1e-6); a frozen weight costs no weight-gradient dot."""
    from model.forward import dense, gelu_tanh

    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    n_in = len(equation.split(",")[0]) - 2
    ours = lambda x, w: jnp.sum(gelu_tanh(dense(x, w, n_in)) ** 2)
    ref = lambda x, w: jnp.sum(jax.nn.gelu(jnp.einsum(equation, x, w), approximate=True) ** 2)
    np.testing.assert_allclose(dense(x, w, n_in), jnp.einsum(equation, x, w), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        assert float(jnp.max(jnp.abs(b))) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    count = lambda f, *argnums: jax.jit(jax.grad(f, argnums)).lower(x, w).as_text().count("dot_general")
    assert count(ours, 0) == 2 and count(ours, 0, 1) == 3  # forward + d(x), then + d(w) only when asked
