"""Benchmark the batched KV-cache sampler: prefill and decode throughput per batch size.

    bin/bench_sample                          # embedded Gemma 3 270M, batches 1, 8, 32, 150 + 128 tokens
    bin/bench_sample --random_270m --batch_sizes 32 --repeats 1

The method and what each column means: model/sample_bench.py. --dtype auto samples as bin/train does (float32
on CPU, bfloat16 on an accelerator).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags

from bin import cli
from grpo import profile_ops
from model import sample_bench, sampler

FLAGS = flags.FLAGS
cli.define_model_dir_flag()
flags.DEFINE_bool("random_270m", False, "Use random weights with the gemma3-270m preset shape instead.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to measure.")
flags.DEFINE_integer("prompt_len", 150, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed repeats after the warm-up (the median is reported).")
flags.DEFINE_integer("num_repeats", 1, "Rows per distinct prompt sharing ONE prefill (GRPO's G; prefill 'repeats'): "
                     "the batch is batch / num_repeats prompts, each prefilled once and its cache rows replicated.")
flags.DEFINE_string("profile_dir", None, "Trace one decode per batch size with jax.profiler into <dir>/b<batch>/ "
                    "and print its top HLO ops by named scope (bin/profile_ops.py).")
flags.DEFINE_bool("json", False, "Print one JSON object with every row on the last line of stdout.")
flags.DEFINE_bool("compare_hf", False, "Then run HF transformers' generate on the same shapes, dtype and device "
                  "(the GPU when torch sees one) in the same invocation (tests/bench_hf_generate.py; needs the "
                  "reference extra) and print end-to-end ratios.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Weights and sampling dtype. auto: float32 on CPU "
                  "(bf16 is slower there), bfloat16 on accelerators (bin/train samples in its compute dtype).")
flags.DEFINE_list("check_every", [str(sampler.CHECK_EVERY)], "Decode steps between checks that every row is done "
                  "(model.sampler.decode; 1 = check after every token); several: one row per value.")
flags.DEFINE_list("command_buffer", ["default"], "GPU only: which XLA:GPU command buffers (CUDA graphs) decode "
                  "compiles with, one row per value: default (the sampler's own setting), while (XLA's usual kinds "
                  "plus while loops and conditionals, run on the device), off.")


def _check_flags() -> tuple[list[int], list[int], sample_bench.SampleShape]:
    """(batch sizes, check_every values, the shape), every flag checked; --profile_dir last (it is created)."""
    batches, every = cli.integers("batch_sizes"), cli.integers("check_every")
    cli.check_at_least(1, "repeats")
    with cli.flag_errors():  # the messages name the flag
        shape = sample_bench.SampleShape(FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.num_repeats)
        sample_bench.check_rows(batches, every, FLAGS.command_buffer, shape)
    if FLAGS.compare_hf and FLAGS.random_270m:
        raise cli.FlagError("--compare_hf: needs a checkpoint both sides can load (drop --random_270m)")
    if FLAGS.profile_dir is not None:
        cli.check_writable_dir("profile_dir", FLAGS.profile_dir)
    return batches, every, shape


def _load_model(dtype: str):
    if FLAGS.random_270m:
        return (*sample_bench.random_270m(dtype), "random gemma3-270m")
    path = cli.resolve_model_dir(FLAGS.model_dir)
    return (*cli.load_model(path, jnp.dtype(dtype)), path.name)


def _measure(model_cfg, params, batch: int, check_every: int, command_buffer: str, shape) -> dict:
    p = sample_bench.compile_batch(model_cfg, params, batch, shape, check_every, command_buffer)
    times = sample_bench.time_batch(p, FLAGS.repeats)
    if FLAGS.profile_dir is not None:
        trace = Path(FLAGS.profile_dir) / f"b{batch}"
        sample_bench.trace_decode(p, trace)
        print(f"profile of one decode ({FLAGS.new_tokens - 1} steps), batch {batch}, in {trace}:")
        print(profile_ops.summary(profile_ops.top_ops(trace), profile_ops.scope_names(p.decode.as_text())))
    return sample_bench.batch_row(p, model_cfg, shape, *times)


def _compare_hf(batches: list[int], rows: list[dict], dtype: str) -> list[dict]:
    """HF generate on the same shapes (tests/bench_hf_generate.py), each batch's first row given its ratio."""
    model_dir = str(cli.resolve_model_dir(FLAGS.model_dir))
    hf = [cli.run_reference_script("bench_hf_generate.py", "--model_dir", model_dir, "--batch", str(batch),
                                   "--prompt_len", str(FLAGS.prompt_len), "--new_tokens", str(FLAGS.new_tokens),
                                   "--repeats", str(FLAGS.repeats), "--dtype", dtype) for batch in batches]
    print("\n".join(sample_bench.compare_to_hf(rows, batches, hf)))
    return hf


def main(argv):
    cli.no_extra_args(argv)
    cli.expand_user("profile_dir")
    batches, every, shape = _check_flags()
    dtype = sample_bench.sample_dtype(FLAGS.dtype, jax.default_backend())
    model_cfg, params, name = _load_model(dtype)
    print(f"{name}: {dtype}, prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, greedy, no early stop, "
          f"median of {FLAGS.repeats} after a warm-up; {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(" | ".join(sample_bench.HEADER))
    rows = []
    for batch in batches:
        for check_every, command_buffer in [(c, b) for c in every for b in FLAGS.command_buffer]:
            r = _measure(model_cfg, params, batch, check_every, command_buffer, shape)
            rows.append(r)
            print(sample_bench.format_row(r), flush=True)
    out = {"model": name, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens, "dtype": dtype,
           "device": jax.devices()[0].device_kind, "num_repeats": FLAGS.num_repeats, "rows": rows}
    if FLAGS.compare_hf:
        del params
        out["hf"] = _compare_hf(batches, rows, dtype)
    if FLAGS.json:
        print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main)
