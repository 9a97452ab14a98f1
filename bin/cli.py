"""The flags several binaries share (model dir, tokenizer, dtype, mesh), the checks behind them, and how a
binary starts.

Every tool in bin/ is a module run as `python -m bin.<name>` (the extension-less `bin/<name>` files are one
launcher script that does exactly that). A tool defines its flags at import, calls `cli.run(main)` (through a
`run()` where pyproject.toml's [project.scripts] names one), and raises `FlagError("--flag: what was expected,
what was found")` for bad input: `run` prints it as ONE line, `error: ...`, on stderr and exits with status 2,
before anything compiles.

Nothing here imports jax at module import (a tool's --help stays fast). The checks behind the flags that are
library code (the mesh's text, the tokenizer against the model, fake CPU devices) live under grpo/ and model/ and
raise ValueError naming the flag; the wrappers here turn that into a FlagError.
"""

from __future__ import annotations

import contextlib
import os.path
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # the define_* functions below make key flags of the tool that calls them: its --help


class FlagError(ValueError):
    """A bad flag value: printed as one line naming the flag, exit status 2."""


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """app.run(main), with FlagError and absl's own flag-parsing errors (an unknown flag, `--steps=abc`)
    turned into ONE line `error: <message>` on stderr and exit status 2 (absl's default is status 1 and a
    usage hint). argv: the command line (default sys.argv), so a test can run a binary in its own process."""

    def guarded(argv: list[str]) -> None:
        if not FLAGS["verbosity"].present:  # absl's default shows INFO: JAX probing for a TPU, orbax's every file
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except FlagError as e:
            fail(str(e))
        except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
            print("interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(130)

    app.run(guarded, argv=argv, flags_parser=_parse_flags)


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


@contextlib.contextmanager
def flag_errors(prefix: str = "", errors: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
    """The errors raised inside as one FlagError line: library code raises ValueError naming the flag (or
    `prefix` names it), and this is where bin/ turns that into exit status 2."""
    try:
        yield
    except errors as e:
        raise FlagError(prefix + str(e)) from None


def integers(name: str) -> list[int]:
    """A list flag's values as integers, or a FlagError naming it."""
    try:
        return [int(v) for v in FLAGS[name].value]
    except ValueError:
        raise FlagError(f"--{name} must be integers, got {FLAGS[name].value}") from None


def check_at_least(low: int, *names: str) -> None:
    """Each named integer flag is >= low, or a FlagError naming the first that is not."""
    for name in names:
        if FLAGS[name].value < low:
            raise FlagError(f"--{name} must be >= {low}, got {FLAGS[name].value}")


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


def define_think_flags() -> None:
    """s1 budget forcing (model/think_budget.py, the defaults' home); both budgets 0: off."""
    from model.think_budget import ThinkBudget
    d = ThinkBudget()
    flags.DEFINE_integer("min_think_tokens", d.min_think_tokens, "Replace a </think> that comes before this many "
                         f"thinking tokens with --wait_text, at most {d.max_waits} times per completion (0: off).")
    flags.DEFINE_integer("max_think_tokens", d.max_think_tokens, "Force </think> once thinking reaches this many "
                         "tokens (0: off).")
    flags.DEFINE_string("wait_text", d.wait_text, "Text forced where an early </think> began.")


def think_budget(max_new_tokens: int):
    """The thinking-budget flags as a ThinkBudget within max_new_tokens, or a FlagError naming the flag."""
    from model.think_budget import ThinkBudget
    with flag_errors("--"):  # the config names the field, which is the flag's name
        return ThinkBudget(FLAGS.min_think_tokens, FLAGS.max_think_tokens, FLAGS.wait_text).check_fits(max_new_tokens)


# --- checks and loaders --------------------------------------------------------------------------------------


def parse_mesh(text: str | None, num_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4} (grpo.sharding.parse_mesh), as a FlagError."""
    from grpo.sharding import parse_mesh as parse

    with flag_errors():
        return parse(text, num_devices)


def resolve_model_dir(value: str | None) -> Path:
    """--model_dir as a directory that exists; None means the embedded Gemma 3 270M (imported on first use)."""
    if value is None:
        from model.default_model import default_model_dir

        return Path(default_model_dir())
    if not value.strip():
        raise FlagError("--model_dir is empty: name a checkpoint directory or leave the flag out")
    if not (path := Path(value).expanduser()).is_dir():
        why = "not a directory" if path.exists() else "checkpoint directory not found"
        raise FlagError(f"--model_dir: {why}: {path}")
    return path


def load_model_config(model_dir: Path):
    """The checkpoint's GemmaConfig, or a one-line error naming --model_dir."""
    import model

    with flag_errors("--model_dir: ", (ValueError, OSError)):
        return model.load_config(model_dir)


def load_model(model_dir: Path, dtype, mesh=None):
    """(model_cfg, params) from the checkpoint (laid out on `mesh` as read); a bad tensor is one line."""
    from grpo.policy import load_on_mesh

    with flag_errors("--model_dir: ", (ValueError, OSError)):
        return load_on_mesh(model_dir, dtype, mesh)


def load_tokenizer(value: str | None, model_dir: Path, model_cfg):
    """The SentencePiece tokenizer (--tokenizer or <model_dir>/tokenizer.model), checked against the model."""
    from model.tokenizer import load_for_model

    if value is not None and not value.strip():
        raise FlagError("--tokenizer is empty: name a tokenizer.model or leave the flag out")
    with flag_errors():
        return load_for_model(Path(value).expanduser() if value else model_dir / "tokenizer.model", model_cfg)


def run_reference_script(name: str, *args: str) -> dict:
    """tests/<name>, an HF transformers baseline (model/hf_reference.py): its output echoed, its JSON result
    returned; a failure is one line naming --compare_hf."""
    from model.hf_reference import run_reference_script as run_script

    with flag_errors():
        return run_script(name, *args, echo=lambda text: print(text, end=""))


def lora_config(model_cfg):
    """--lora_* as a LoraConfig checked against the model (one line naming the flag), or None for rank 0."""
    from model.lora import TARGETS, LoraConfig, validate_lora

    with flag_errors():  # the message names the flag
        targets = TARGETS if FLAGS.lora_targets is None else tuple(FLAGS.lora_targets)  # "" is no target: an error
        lora_cfg = LoraConfig(FLAGS.lora_rank, FLAGS.lora_alpha, targets)
        validate_lora(lora_cfg, model_cfg)
    return lora_cfg if lora_cfg.rank else None


def resolve_dtypes(name: str, backend: str):
    """--dtype -> (param dtype, compute dtype or None). auto: float32 params, bf16 compute unless on CPU."""
    import jax.numpy as jnp

    if name == "bfloat16":
        return jnp.bfloat16, None
    compute = "bfloat16" if name == "auto" and backend != "cpu" else None
    return jnp.float32, compute


def expand_user(*names: str) -> None:
    """Path flags with `~` expanded in place (the shell leaves `--flag=~/x` alone; a multi-host run calls this once
    its processes agreed on the flags as typed); an empty one is an error (Path("") is the working directory)."""
    for name in names:
        if FLAGS[name].value is not None and not FLAGS[name].value.strip():
            raise FlagError(f"--{name} is empty: name a path or leave the flag out")
        if FLAGS[name].value:
            FLAGS[name].value = os.path.expanduser(FLAGS[name].value)


def check_writable_dir(flag: str, value: str) -> Path:
    """Create the directory if needed and prove a file can be written in it, before anything expensive runs."""
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a name of its own: the processes of a multi-host run probe at once
            pass
    except OSError as e:
        raise FlagError(f"--{flag}: cannot write into {path} ({e.strerror or e})") from None
    return path
