"""Import a llama.cpp GGUF (Gemma 2 or Gemma 3 text) into a plain HF checkpoint directory.

The directory holds `config.json` (written by `model.config.save_config`), float32 safetensors written by
`model.checkpoint.save_tensors` (HF names, PyTorch [out, in] order, zero-centred norms; one model.safetensors
up to 2 GiB, HF-style shards beyond) and a `tokenizer.model` rebuilt as a SentencePiece ModelProto from the
GGUF vocabulary, so everything downstream (our loader, HF transformers, sentencepiece) reads it like any HF
download.

What the conversion relies on (llama.cpp's Gemma converter, `convert_hf_to_gguf.py`,
https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py, classes Gemma2Model / Gemma3Model;
GGUF key names: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
- Tensor names map one to one (`_TABLE`); every tensor is dequantized to float32 with
  `gguf.quants.dequantize`, which already yields PyTorch's [out, in]; Gemma needs no q/k permutation.
- Gemma's RMSNorm scales by (1 + w); HF stores w, the converter stores 1 + w, so we subtract 1.
- GGUF metadata lacks query_pre_attn_scalar, the layer pattern and the local rope base; they are filled in from
  the released configs (https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/
  configuration_gemma3.py and the Gemma 2 / 3 reports https://arxiv.org/abs/2408.00118,
  https://arxiv.org/abs/2503.19786): qpas = head_dim, except D / N for the 27B models (the only ones with
  head_dim 128); Gemma 2 alternates sliding / global from layer 0; Gemma 3 repeats five sliding, one global
  (unless the GGUF carries the period); the local rope base is 10k.
- The tensor names and shapes are checked against the config (`model.checkpoint.hf_tensor_shapes`) before any
  tensor is dequantized; then tensors are dequantized and written one file's worth at a time.
- The import is atomic: it writes into a temp directory beside `out_dir` and renames it at the end, and a
  manifest (written last, listing the files) marks a complete import, so importing again is a no-op and a
  failure leaves nothing behind.
`gguf` (and protobuf, for the tokenizer) are imported lazily: they belong to the `gguf` extra.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import hf_tensor_shapes, save_tensors
from model.config import GemmaConfig, gemma2_layer_types, gemma3_layer_types, save_config

MANIFEST = "import_manifest.json"
_OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.model")  # for a manifest that lists no files
_IMPORTER_VERSION = 2  # 2: weights via model.checkpoint.save_tensors (sharded above 2 GiB); 1 dirs stay valid
_SUPPORTED_ARCHS = ("gemma2", "gemma3")
_NORM_SHIFT = 1.0  # llama.cpp's Gemma converters store norm weights as 1 + w
_DEFAULT_LOCAL_ROPE_BASE = 10_000.0  # Gemma 3 sliding layers; GGUF only carries the global base
_GEMMA3_PATTERN = 6  # Gemma 3: five sliding layers, then one global
INSTALL_HINT = "pip install -e '.[gguf]'"

# GGUF token types (llama.cpp) -> SentencePiece ModelProto.SentencePiece.Type; both: 1 normal, 2 unknown,
# 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_GGUF_TO_SP_TYPE = {1: _NORMAL, 2: _UNKNOWN, 3: _CONTROL, 4: _USER_DEFINED, 5: _UNUSED, 6: _BYTE}
_SPACE = "\u2581"  # "▁": SentencePiece's escaped space


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _unshift_norm(x: np.ndarray) -> np.ndarray:
    # Gemma's RMSNorm scales by (1 + w); HF stores w, llama.cpp stores 1 + w.
    return x - np.float32(_NORM_SHIFT)


# GGUF name pattern -> (HF name template, transform). `{0}` is the layer index.
_TABLE: tuple[tuple[re.Pattern[str], str, Callable[[np.ndarray], np.ndarray]], ...] = tuple(
    (re.compile(p), name, fn)
    for p, name, fn in (
        (r"token_embd\.weight", "model.embed_tokens.weight", _identity),
        (r"output_norm\.weight", "model.norm.weight", _unshift_norm),
        (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{0}.self_attn.q_proj.weight", _identity),
        (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{0}.self_attn.k_proj.weight", _identity),
        (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{0}.self_attn.v_proj.weight", _identity),
        (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight", _identity),
        (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{0}.self_attn.q_norm.weight", _unshift_norm),
        (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{0}.self_attn.k_norm.weight", _unshift_norm),
        (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight", _identity),
        (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight", _identity),
        (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight", _identity),
        (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight", _unshift_norm),
        (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight",
         _unshift_norm),
        # llama.cpp calls the pre-MLP norm `ffn_norm`.
        (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.pre_feedforward_layernorm.weight", _unshift_norm),
        (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{0}.post_feedforward_layernorm.weight",
         _unshift_norm),
    )
)


# --- config ------------------------------------------------------------------------------------------------------


def _query_pre_attn_scalar(d: int, heads: int, head_dim: int) -> int:
    # Not in GGUF. Gemma 2 27B and Gemma 3 27B (the only ones with head_dim 128) scale by D / N; all others by H.
    return d // heads if head_dim == 128 else head_dim


def _layer_types(arch: str, layers: int, pattern: Any) -> tuple[str, ...]:
    if arch == "gemma2":
        return gemma2_layer_types(layers)
    # Newer GGUFs may carry the period as an int; older ones not at all.
    period = int(pattern) if isinstance(pattern, int | np.integer) and int(pattern) > 0 else _GEMMA3_PATTERN
    return gemma3_layer_types(layers, period)


def _f32(x: Any) -> float:
    # GGUF stores float32; keep the shortest decimal that round-trips (9.99999997e-07 -> 1e-06).
    return float(str(np.float32(x)))


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> GemmaConfig:
    """The GemmaConfig described by the GGUF scalar metadata `meta` (key -> value)."""
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; expected one of {list(_SUPPORTED_ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return value

    d, layers, heads = int(get("embedding_length")), int(get("block_count")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d // heads))
    gemma3 = arch == "gemma3"
    rope_global = _f32(get("rope.freq_base", 1_000_000.0 if gemma3 else 10_000.0))
    scale = 1.0
    if meta.get(f"{arch}.rope.scaling.type", "none") == "linear":
        scale = _f32(get("rope.scaling.factor"))
    return GemmaConfig(
        name=str(meta.get("general.name", "gguf")), arch=arch, vocab_size=vocab_size, num_layers=layers,
        embed_dim=d, hidden_dim=int(get("feed_forward_length")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        query_pre_attn_scalar=_query_pre_attn_scalar(d, heads, head_dim),
        sliding_window=int(get("attention.sliding_window", 4096)),
        layer_types=_layer_types(arch, layers, meta.get(f"{arch}.attention.sliding_window_pattern")),
        rope_base_global=rope_global,
        rope_base_local=_f32(get("rope.freq_base_swa", _DEFAULT_LOCAL_ROPE_BASE)) if gemma3 else rope_global,
        rope_scale_global=scale,
        # Gemma 2 soft-caps attention at 50 and logits at 30; Gemma 3 does not.
        attn_softcap=None if gemma3 else _f32(get("attn_logit_softcapping", 50.0)),
        final_softcap=None if gemma3 else _f32(get("final_logit_softcapping", 30.0)),
        rms_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)), use_qk_norm=gemma3,
        pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
    )


# --- tensors -----------------------------------------------------------------------------------------------------


def _map_name(gguf_name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    for pattern, template, fn in _TABLE:
        m = pattern.fullmatch(gguf_name)
        if m:
            return template.format(*m.groups()), fn
    return None


def _plan_tensors(reader: Any, cfg: GemmaConfig) -> list[tuple[Any, str, Callable[[np.ndarray], np.ndarray]]]:
    """(GGUF tensor, HF name, transform) for every tensor, checked against `cfg` from the GGUF header alone.

    Fails listing unexpected, missing and mis-shaped names in one message.
    """
    want = hf_tensor_shapes(cfg)
    plan, seen, unexpected, misshaped = [], set(), [], []
    for t in reader.tensors:
        mapped = _map_name(t.name)
        if mapped is None or mapped[0] not in want:  # e.g. q_norm in a Gemma 2 file
            unexpected.append(t.name)
            continue
        seen.add(mapped[0])
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        if shape != want[mapped[0]]:
            misshaped.append(f"{t.name} {shape} (expected {want[mapped[0]]})")
            continue
        plan.append((t, *mapped))
    missing = sorted(want.keys() - seen)
    if unexpected or missing or misshaped:
        raise ValueError(f"GGUF tensors do not match a {cfg.arch} model: unexpected {unexpected}, "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, mis-shaped {misshaped}")
    return plan


def _dequantized(plan: list, *, progress: Callable[[str], None]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 HF-form array) one tensor at a time."""
    from gguf.quants import dequantize

    for i, (t, name, fn) in enumerate(plan):
        x = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # [out, in], like PyTorch
        yield name, fn(x)
        if (i + 1) % 50 == 0:
            progress(f"  dequantized {i + 1}/{len(plan)} tensors")


# --- tokenizer ---------------------------------------------------------------------------------------------------


def sentencepiece_from_vocab(tokens: list[str], scores: list[float], types: list[int], *,
                             bos_id: int = 2, eos_id: int = 1, pad_id: int = 0, unk_id: int = 3) -> bytes:
    """A serialized SentencePiece BPE ModelProto equivalent to the Gemma tokenizer the GGUF vocab came from."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"GGUF vocab arrays disagree: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types")
    proto = sp_pb2.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        sp_type = _GGUF_TO_SP_TYPE.get(int(kind), _NORMAL)
        if i == unk_id:
            sp_type = _UNKNOWN  # GGUF marks <unk> as control; SentencePiece needs exactly one UNKNOWN piece
        elif sp_type == _CONTROL and i not in (bos_id, eos_id, pad_id):
            # SentencePiece never matches control pieces in text, so <start_of_turn> would be split into characters.
            sp_type = _USER_DEFINED
        if sp_type == _USER_DEFINED:
            # llama.cpp matches user-defined tokens in raw text, so its converter unescapes "▁" to " " in them
            # (the whitespace-run pieces 138..167); SentencePiece matches escaped text, so escape them back.
            piece = piece.replace(" ", _SPACE)
        proto.pieces.add(piece=piece, score=float(score), type=sp_type)
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk_id, bos_id, eos_id, pad_id
    # SentencePiece finds the special ids by piece NAME; the defaults (<s>, </s>) would make bos_id() -1.
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = (tokens[j] for j in (unk_id, bos_id, eos_id, pad_id))
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False  # Gemma keeps text as is: no leading "▁", whitespace runs preserved
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


def _array_field(reader: Any, key: str) -> list[Any]:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF metadata is missing {key}")
    if key == "tokenizer.ggml.tokens":  # decode bytes ourselves: faster than contents() on 262k strings
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


_SPECIAL_PIECES = {"bos": "<bos>", "eos": "<eos>", "padding": "<pad>", "unknown": "<unk>"}


def with_special_ids(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """meta with its bos / eos / padding / unknown ids taken from Gemma's pieces by name where the vocab has them.

    An instruction-tuned GGUF names <end_of_turn> as its eos: imported as is, a row that emits <eos> would not
    stop and <eos> would become plain text. <end_of_turn> is a chat stop (model/tokenizer.py `stop_ids`); <eos>
    stays the eos. A vocab without these pieces keeps the metadata's ids (Gemma's defaults where it has none).
    """
    by_name = {piece: i for i, piece in enumerate(tokens) if piece in _SPECIAL_PIECES.values()}
    out = dict(meta)
    for kind, default in (("bos", 2), ("eos", 1), ("padding", 0), ("unknown", 3)):
        key = f"tokenizer.ggml.{kind}_token_id"
        out[key] = by_name.get(_SPECIAL_PIECES[kind], int(meta.get(key, default)))
    return out


def _tokenizer_bytes(reader: Any, meta: dict[str, Any], tokens: list[str]) -> bytes:
    """The SentencePiece model of the GGUF's vocab; meta: with_special_ids's."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":  # llama.cpp's name for a SentencePiece vocabulary
        raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; expected 'llama' (SentencePiece)")
    scores, types = _array_field(reader, "tokenizer.ggml.scores"), _array_field(reader, "tokenizer.ggml.token_type")
    ids = {k: int(meta[f"tokenizer.ggml.{k}_token_id"]) for k in _SPECIAL_PIECES}
    return sentencepiece_from_vocab(tokens, scores, types, bos_id=ids["bos"], eos_id=ids["eos"],
                                    pad_id=ids["padding"], unk_id=ids["unknown"])


# --- reading and writing -----------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _open_reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError(f"importing a GGUF needs the `gguf` package: {INSTALL_HINT}") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted types (ValueError, IndexError, ...) on bad bytes
        raise ValueError(f"{path} is not a readable GGUF file ({_one_line(e)})") from None


def _scalar_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:  # scalars and strings; arrays (the vocab) are read separately
            value = field.contents()
            meta[key] = value
    return meta


def _manifest_files(out_dir: Path) -> list[str] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return list(files) if files else list(_OUTPUT_FILES)


def is_complete_import(out_dir: str | Path) -> bool:
    """True when `out_dir` holds a finished import (its manifest and every file it lists)."""
    out_dir = Path(out_dir)
    files = _manifest_files(out_dir)
    return files is not None and all((out_dir / f).is_file() for f in files)


def _check_existing(out_dir: Path, gguf_path: Path) -> bool:
    """True if `out_dir` already holds this import; raises if it holds something else."""
    if not out_dir.exists():
        return False
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty directory is as good as none; the final rename needs the name free
        return False
    if not is_complete_import(out_dir):
        raise ValueError(f"{out_dir} exists but is not a complete GGUF import (no {MANIFEST}); remove it or pick "
                         "another output directory")
    manifest = json.loads((out_dir / MANIFEST).read_text())
    if manifest.get("source_bytes") != gguf_path.stat().st_size:
        raise ValueError(f"{out_dir} holds an import of {manifest.get('source')!r} "
                         f"({manifest.get('source_bytes')} bytes), not of {gguf_path} ({gguf_path.stat().st_size} "
                         "bytes); remove it or pick another output directory")
    return True


def _write_checkpoint(gguf_path: Path, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    progress(f"opening {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB; parsing a large vocab takes "
             "~30 s)")
    reader = _open_reader(gguf_path)
    try:
        tokens = _array_field(reader, "tokenizer.ggml.tokens")
        meta = with_special_ids(_scalar_metadata(reader), tokens)
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise ValueError("GGUF has no token_embd.weight tensor")
        cfg = config_from_gguf(meta, vocab_size=int(embed.shape[-1]))  # GGUF shapes are [in, out]
        progress(f"opened in {time.monotonic() - t0:.0f} s: {cfg.name}, {cfg.num_layers} layers, "
                 f"{len(reader.tensors)} tensors")
        plan = _plan_tensors(reader, cfg)
        (tmp / "tokenizer.model").write_bytes(_tokenizer_bytes(reader, meta, tokens))
        context = int(meta.get(f"{cfg.arch}.context_length", 8192))
        save_config(tmp, cfg, max_position_embeddings=context, torch_dtype="float32")
        progress(f"writing float32 safetensors ({4 * sum(int(t.n_elements) for t, _, _ in plan) / 2**30:.2f} GiB)")
        weights = save_tensors(tmp, _dequantized(plan, progress=progress))
    except (IndexError, KeyError, TypeError) as e:  # inconsistent metadata in a file that parsed
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({_one_line(e)})") from None
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    return {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "importer_version": _IMPORTER_VERSION,
            "files": ["config.json", *weights, "tokenizer.model"], "seconds": round(time.monotonic() - t0, 1)}


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: Callable[[str], None] = print) -> Path:
    """Import a Gemma 2 / Gemma 3 GGUF into an HF checkpoint directory `out_dir`; a no-op if already done."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if _check_existing(out_dir, gguf_path):
        progress(f"{out_dir} already holds this import; nothing to do")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        manifest = _write_checkpoint(gguf_path, tmp, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks a complete dir
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary readable directory
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_complete_import(out_dir):  # another process finishing first is fine; anything else is not
                raise
            progress(f"{out_dir} was completed by another process; keeping that one")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"imported {gguf_path.name} -> {out_dir} in {manifest['seconds']:.0f} s")
    return out_dir
