"""The flags several binaries share (model dir, tokenizer, dtype, mesh), the checks behind them, and how a
binary starts.

Every tool in bin/ is a module run as `python -m bin.<name>` (the extension-less `bin/<name>` files are one
launcher script that does exactly that). A tool defines its flags at import, calls `cli.run(main)`, and
raises `FlagError("--flag: what was expected, what was found")` for bad input: `run` prints it as ONE line,
`error: ...`, on stderr and exits with status 2, before anything compiles.

Nothing here imports jax at module import: bin/inspect must set XLA_FLAGS (fake devices) before jax loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
MESH_AXES = ("data", "fsdp")
# A multimodal checkpoint's vocabulary carries a few rows more than its tokenizer (image tokens); a tokenizer
# of another model family differs by thousands.
MAX_EXTRA_VOCAB_ROWS = 1024


class FlagError(ValueError):
    """A bad flag value: printed as one line naming the flag, exit status 2."""


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main), with FlagError and absl's own flag-parsing errors (an unknown flag, `--steps=abc`)
    turned into ONE line `error: <message>` on stderr and exit status 2 (absl's default is status 1 and a
    usage hint)."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except FlagError as e:
            fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)


def fail(message: str) -> None:
    """Exit with status 2 after one line `error: <message>` on stderr."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


def no_extra_args(argv: list[str]) -> None:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")


# --- flag definitions ----------------------------------------------------------------------------------------


def define_model_dir_flag() -> None:
    flags.DEFINE_string("model_dir", None, "HF-layout checkpoint dir (config.json + safetensors + tokenizer.model). "
                        "Default: the embedded Gemma 3 270M, imported once from the GGUF package into ~/.cache.")
    flags.DEFINE_alias("checkpoint", "model_dir")  # bin/sample's old name


def define_tokenizer_flag() -> None:
    flags.DEFINE_string("tokenizer", None, "SentencePiece model file. Default: <model_dir>/tokenizer.model.")


def define_dtype_flag(default: str = "auto") -> None:
    flags.DEFINE_enum("dtype", default, ["auto", "float32", "bfloat16"],
                      "Param dtype. auto: float32 params (and Adam state) everywhere, bfloat16 compute off-CPU "
                      "(bf16 params lose lr-1e-6 updates; on CPU bf16 is slower than float32).")


def define_mesh_flag(default: str | None = None) -> None:
    flags.DEFINE_string("mesh", default, "Device mesh as data=N,fsdp=M (either may be left out: 1). "
                        "Default: fsdp over all devices.")


def define_lora_flags(default_rank: int = 0) -> None:
    flags.DEFINE_integer("lora_rank", default_rank, "LoRA adapter rank; 0: full fine-tuning. Adapters train (use a "
                         "larger --learning_rate than full fine-tuning, e.g. 1e-5 to 1e-4), the base model stays "
                         "frozen.")
    flags.DEFINE_float("lora_alpha", None, "LoRA alpha: the update is scaled by alpha / rank. Default: 2 * rank.")
    flags.DEFINE_list("lora_targets", None, "Projections that get adapters, from q,k,v,o,gate,up,down. Default: all.")


# --- checks and loaders --------------------------------------------------------------------------------------


def parse_mesh(text: str | None, num_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}. None/'' -> fsdp over num_devices. Checks the device count
    when num_devices is given."""
    if not text:
        if num_devices is None:
            raise FlagError("--mesh: expected data=N,fsdp=M")
        return {"data": 1, "fsdp": num_devices}
    axes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in axes or not value.isdigit() or int(value) < 1:
            raise FlagError(f"--mesh: expected entries like data=2,fsdp=4, got {part!r} in {text!r}")
        axes[name] = int(value)
    used = axes["data"] * axes["fsdp"]
    if num_devices is not None and used != num_devices:
        raise FlagError(f"--mesh: {text} uses {used} devices but {num_devices} are present")
    return axes


def resolve_model_dir(value: str | None) -> Path:
    """--model_dir as a directory that exists; None means the embedded Gemma 3 270M (imported on first use)."""
    if value is None:
        from model.default_model import default_model_dir

        return Path(default_model_dir())
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FlagError(f"--model_dir: checkpoint directory not found: {path}")
    return path


def load_model_config(model_dir: Path):
    """The checkpoint's GemmaConfig, or a one-line error naming --model_dir."""
    import model

    try:
        return model.load_config(model_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise FlagError(f"--model_dir: {e}") from None


def load_model(model_dir: Path, dtype):
    """(model_cfg, params) from the checkpoint; a missing, truncated or mis-shaped tensor is one line."""
    import model

    try:
        return model.load_hf_checkpoint(model_dir, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise FlagError(f"--model_dir: {' '.join(str(e).split())}") from None


def load_tokenizer(value: str | None, model_dir: Path, model_cfg):
    """The SentencePiece tokenizer (--tokenizer or <model_dir>/tokenizer.model), checked against the model."""
    from model.tokenizer import Tokenizer

    path = Path(value).expanduser() if value else model_dir / "tokenizer.model"
    if not path.is_file():
        raise FlagError(f"--tokenizer: no tokenizer file at {path}")
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError, ValueError) as e:
        raise FlagError(f"--tokenizer: {path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    if not 0 <= model_cfg.vocab_size - tok.vocab_size <= MAX_EXTRA_VOCAB_ROWS:
        raise FlagError(f"--tokenizer: {path} has {tok.vocab_size} pieces but the model's vocabulary is "
                        f"{model_cfg.vocab_size}: tokenizer and model do not match")
    return tok


def compiled_peak_bytes(compiled) -> int:
    """XLA's memory analysis of a compiled program: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def run_reference_script(name: str, *args: str) -> dict:
    """tests/<name> (an HF transformers baseline, the reference extra) in a subprocess, so torch and our JAX
    buffers never share memory; echoes its output and returns the JSON object on its last line. A failure is
    one line naming --compare_hf."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent.parent / "tests" / name
    done = subprocess.run([sys.executable, str(script), *args, "--json"], capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise FlagError(f"--compare_hf: {name}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def preset_config(preset: str):
    """A model preset by name (model.PRESETS), or tiny-gemma2 / tiny-gemma3; ValueError when unknown."""
    import model

    if preset.startswith("tiny-"):
        return model.tiny_config(preset.removeprefix("tiny-"))
    return model.get_preset(preset)


def lora_config(model_cfg):
    """--lora_* as a LoraConfig checked against the model (one line naming the flag), or None for rank 0."""
    from model.lora import TARGETS, LoraConfig, validate_lora

    try:
        lora_cfg = LoraConfig(FLAGS.lora_rank, FLAGS.lora_alpha, tuple(FLAGS.lora_targets or TARGETS))
        validate_lora(lora_cfg, model_cfg)
    except ValueError as e:  # the message names the flag
        raise FlagError(" ".join(str(e).split())) from None
    return lora_cfg if lora_cfg.rank else None


def resolve_dtypes(name: str, backend: str):
    """--dtype -> (param dtype, compute dtype or None). auto: float32 params, bf16 compute unless on CPU."""
    import jax.numpy as jnp

    if name == "bfloat16":
        return jnp.bfloat16, None
    compute = "bfloat16" if name == "auto" and backend != "cpu" else None
    return jnp.float32, compute


def check_writable_dir(flag: str, value: str) -> Path:
    """Create the directory if needed and prove a file can be written in it, before anything expensive runs."""
    path = Path(value).expanduser()
    probe = path / ".write_probe"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FlagError(f"--{flag}: cannot write into {path} ({e.strerror or e})") from None
    return path


def set_fake_cpu_devices(count: int, platform: str = "cpu") -> None:
    """Before jax is imported: pick the platform and, on CPU, fake `count` devices (for abstract lowering)."""
    if "jax" in sys.modules:
        raise RuntimeError("fake devices must be configured before jax is imported")
    os.environ["JAX_PLATFORMS"] = platform
    if platform == "cpu":
        flag = "--xla_force_host_platform_device_count"
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
        os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={count}"])
