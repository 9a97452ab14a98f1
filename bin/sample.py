"""Sample completions from a Gemma checkpoint with the batched KV-cache sampler (model.generate).

    bin/sample --prompt "Paris is the capital of" --temperature 0 --max_new_tokens 16
    bin/sample --model_dir DIR --prompts_file prompts.txt --num_samples 4 --top_p 0.95 --seed 1

All prompts (each repeated --num_samples times) go through ONE batched generate call. Rows stop at the
tokenizer's stop ids (<eos>, <end_of_turn>). The last line reports generated tokens per second over that
call, compilation included unless --warmup (the first call of a process compiles prefill and decode for its
shapes; --warmup runs the same call once untimed first).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
from absl import flags

import model
from bin import cli
from model.sampling import SamplingConfig

FLAGS = flags.FLAGS
cli.define_model_dir_flag()  # --checkpoint is kept as an alias
cli.define_tokenizer_flag()
cli.define_dtype_flag("float32")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines skipped).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", None, "Keep only the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Nucleus sampling: keep the most likely tokens up to this total probability.")
flags.DEFINE_integer("max_new_tokens", 64, "Generated tokens per completion (at most).")
flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
cli.define_think_flags()
flags.DEFINE_bool("warmup", False, "Run generate once untimed first, so tokens/s excludes compilation.")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The --prompt values followed by the non-blank lines of --prompts_file."""
    out = list(prompts)
    if prompts_file:
        try:
            text = Path(prompts_file).read_text("utf-8-sig")  # a BOM is not prompt text; lines end at \n only
            out += [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        except UnicodeDecodeError as e:
            raise cli.FlagError(f"--prompts_file: {prompts_file} is not UTF-8 ({e.reason} at byte {e.start})") from None
        except OSError as e:  # missing, a directory, unreadable
            raise cli.FlagError(f"--prompts_file: cannot read {prompts_file} ({e.strerror or e})") from None
    if not out:
        raise cli.FlagError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE")
    return out


def main(argv):
    cli.no_extra_args(argv)
    cli.expand_user("prompts_file")
    cli.check_at_least(1, "num_samples", "max_new_tokens")  # before think_budget compares the budgets
    texts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    budget = cli.think_budget(FLAGS.max_new_tokens)
    with cli.flag_errors("--"):  # the config names the field, which is the flag's name
        sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    model_dir = cli.resolve_model_dir(FLAGS.model_dir)
    model_cfg = cli.load_model_config(model_dir)
    tokenizer = cli.load_tokenizer(FLAGS.tokenizer, model_dir, model_cfg)
    prompts = [tokenizer.encode(t, add_bos=True) for t in texts for _ in range(FLAGS.num_samples)]
    with cli.flag_errors():  # the longest prompt and the budget must fit the sampler's cache; the wait text be tokens
        model.sampler.check_fits(max(map(len, prompts)), FLAGS.max_new_tokens)
        think = model.think_forcing(budget, tokenizer.piece_texts(), lambda s: tokenizer.encode(s, add_bos=False),
                                    model_cfg.vocab_size)
    model_cfg, params = cli.load_model(model_dir, cli.resolve_dtypes(FLAGS.dtype, jax.default_backend())[0])

    sample_once = functools.partial(model.generate, params, model_cfg, prompts, jax.random.key(FLAGS.seed),
                                    max_new_tokens=FLAGS.max_new_tokens, temperature=sampling.temperature,
                                    top_k=sampling.top_k, top_p=sampling.top_p, eos_ids=tokenizer.stop_ids, think=think)
    if FLAGS.warmup:
        sample_once()
    start = time.perf_counter()
    result = sample_once()
    elapsed = time.perf_counter() - start

    for row, tokens in enumerate(result.tokens):
        n = int(result.lengths[row])
        stop = "max_new_tokens" if result.truncated[row] else "eos"
        stop += "" if think is None else f", {int(result.forced[row].sum())} forced"
        print(f"=== prompt {row // FLAGS.num_samples}, sample {row % FLAGS.num_samples} ({n} tokens, {stop}) ===")
        print(texts[row // FLAGS.num_samples] + tokenizer.decode(tokens[:n].tolist()))
    total = int(result.lengths.sum())
    compiled = "excluded" if FLAGS.warmup else "included"
    print(f"{total} tokens in {elapsed:.2f} s: {total / elapsed:.1f} tokens/s "
          f"(batch {len(prompts)}, compilation {compiled})")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
