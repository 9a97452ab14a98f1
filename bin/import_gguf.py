"""Import a Gemma 2 / Gemma 3 GGUF into an HF checkpoint directory (config.json, model.safetensors, tokenizer.model).

    bin/import_gguf                                 # the embedded Gemma 3 270M -> the default cache dir
    bin/import_gguf --gguf model.gguf --out DIR     # any Gemma 2 / 3 GGUF
    bin/import_gguf --out DIR                       # the embedded GGUF -> DIR

Importing into a directory that already holds the same import does nothing.
"""


from absl import flags

from bin import cli
from model.default_model import default_model_dir, import_embedded
from model.gguf_import import import_gguf

_GGUF = flags.DEFINE_string("gguf", None, "GGUF file to import; default: the embedded Gemma 3 270M package.")
_OUT = flags.DEFINE_string("out", None, "Output directory; default (only without --gguf): the embedded model's cache "
                           "dir ($AHA_CACHE_DIR/gemma3-270m or ~/.cache/getting-to-aha/gemma3-270m).")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.expand_user("gguf", "out")
    if _GGUF.value is not None and _OUT.value is None:
        raise cli.FlagError("--out is required with --gguf")
    with cli.flag_errors(f"--{'gguf' if _GGUF.value else 'out'}: ", (FileNotFoundError, ValueError, ImportError)):
        if _GGUF.value is not None:
            out = import_gguf(_GGUF.value, _OUT.value)
        elif _OUT.value is not None:
            out = import_embedded(_OUT.value)
        else:
            out = default_model_dir()
    print(out)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
