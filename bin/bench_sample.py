"""Benchmark the batched KV-cache sampler: prefill and decode throughput per batch size.

    bin/bench_sample                          # embedded Gemma 3 270M, batches 1, 8, 32, 150 + 128 tokens
    bin/bench_sample --random_270m --batch_sizes 32 --repeats 1

Method: one random prompt of --prompt_len tokens (bos + ids drawn with numpy seed 0, as in
tests/bench_hf_generate.py, the HF transformers baseline) repeated `batch` times; greedy, no stop ids, so
every row decodes the whole budget. Prefill and decode are separate jitted calls (model.sampler.prefill,
model.sampler.decode), compiled ahead of time, run once as a warm-up, then timed --repeats times (median):
- prefill tok/s = batch * prompt_len / prefill seconds (real tokens; the bucket pads the prompt to a power of
  two, and that padding is computed too);
- decode tok/s = batch * (new_tokens - 1) / decode seconds (prefill samples the first token, the while_loop
  the other new_tokens - 1);
- GFLOP/s = XLA's cost_analysis flops / seconds. cost_analysis counts a loop body once, so decode flops = the
  while_loop body's flops * (new_tokens - 1) (the body attends over all cache slots, as the real loop does), and
  prefill flops = its own count + (L - 1) * the flops of one decoder layer over the padded [batch, bucket].
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import model
from bin import cli, profile_ops
from bin.cli import FlagError
from model import sampler
from model.forward import decoder_layer, layer_constants
from model.sampling import SamplingConfig

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
flags.DEFINE_bool("compare_hf", False, "Then run HF transformers' generate on the same shapes in the same invocation "
                  "(tests/bench_hf_generate.py; needs the reference extra) and print end-to-end ratios.")

BOS, FIRST_FREE_ID = 2, 4
GREEDY = SamplingConfig(temperature=0.0)


def load_model() -> tuple[model.GemmaConfig, dict, str]:
    if FLAGS.random_270m:
        model_cfg = model.get_preset("gemma3-270m")
        params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), model_cfg)
        return model_cfg, params, "random gemma3-270m"
    path = cli.resolve_model_dir(FLAGS.model_dir)
    model_cfg, params = cli.load_model(path, jnp.float32)
    return model_cfg, params, path.name


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def prefill_flops(compiled, model_cfg, params, tokens) -> float:
    """cost_analysis flops of prefill with its layer scan counted L times, not once."""
    lp, c = jax.tree.map(lambda a: a[0], (params["layers"], layer_constants(model_cfg)))
    x = jax.ShapeDtypeStruct((*tokens.shape, model_cfg.embed_dim), params["embed"].dtype)
    pos = jax.ShapeDtypeStruct(tokens.shape, np.int32)
    valid = jax.ShapeDtypeStruct(tokens.shape, bool)
    layer = jax.jit(decoder_layer, static_argnames="cfg").lower(lp, x, c, pos, valid, cfg=model_cfg).compile()
    return compiled.cost_analysis()["flops"] + (model_cfg.num_layers - 1) * layer.cost_analysis()["flops"]


def bench_batch(model_cfg, params, batch: int) -> dict:
    """Times prefill and decode for one batch size; returns the row of the report."""
    ids = np.random.default_rng(0).integers(FIRST_FREE_ID, model_cfg.vocab_size, FLAGS.prompt_len - 1)
    repeats = FLAGS.num_repeats
    tokens, pad = sampler.pad_prompts([[BOS, *ids.tolist()]] * (batch // repeats), model_cfg, FLAGS.new_tokens)
    eos = sampler.stop_rule(model_cfg, ())  # no stop ids: every row decodes the full budget
    key = jax.random.key(0)
    prefill = sampler.prefill.lower(params, tokens, pad, eos, key, cfg=model_cfg, sampling=GREEDY,
                                    max_new_tokens=FLAGS.new_tokens, repeats=repeats).compile()
    state = prefill(params, tokens, pad, eos, key)
    decode = sampler.decode.lower(params, state, eos, cfg=model_cfg, sampling=GREEDY).compile()
    jax.block_until_ready(decode(params, state, eos))  # warm-up (state is donated)

    prefill_times, decode_times = [], []
    for _ in range(FLAGS.repeats):  # decode consumes (donates) its state: a fresh prefill per repeat
        prefill_times.append(_seconds(lambda: prefill(params, tokens, pad, eos, key)))
        state = jax.block_until_ready(prefill(params, tokens, pad, eos, key))
        decode_times.append(_seconds(lambda: decode(params, state, eos)))  # noqa: B023 (called at once)
    if FLAGS.profile_dir is not None:
        trace = Path(FLAGS.profile_dir) / f"b{batch}"
        trace.mkdir(parents=True, exist_ok=True)
        state = jax.block_until_ready(prefill(params, tokens, pad, eos, key))
        jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
        jax.block_until_ready(decode(params, state, eos))
        jax.profiler.stop_trace()
        print(f"profile of one decode ({FLAGS.new_tokens - 1} steps), batch {batch}, in {trace}:")
        print(profile_ops.summary(profile_ops.top_ops(trace), profile_ops.scope_names(decode.as_text())))
    t_prefill, t_decode = statistics.median(prefill_times), statistics.median(decode_times)
    steps = FLAGS.new_tokens - 1
    return {
        "batch": batch,
        "bucket": tokens.shape[1],
        "prefill_s": t_prefill,
        "prefill_tok_s": batch * FLAGS.prompt_len / t_prefill,
        "prefill_gflop_s": prefill_flops(prefill, model_cfg, params, tokens) / t_prefill / 1e9,
        "decode_s": t_decode,
        "decode_tok_s": batch * steps / t_decode,
        "decode_ms_step": t_decode / steps * 1e3,
        "decode_gflop_s": decode.cost_analysis()["flops"] * steps / t_decode / 1e9,
        "end_to_end_tok_s": batch * FLAGS.new_tokens / (t_prefill + t_decode),
    }


def main(argv):
    cli.no_extra_args(argv)
    try:
        batches = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise FlagError(f"--batch_sizes must be integers, got {FLAGS.batch_sizes}") from None
    if min(batches) < 1 or FLAGS.prompt_len < 2 or FLAGS.new_tokens < 2 or FLAGS.repeats < 1:
        raise FlagError("need batch sizes >= 1, --prompt_len >= 2, --new_tokens >= 2, --repeats >= 1")
    if FLAGS.num_repeats < 1 or any(b % FLAGS.num_repeats for b in batches):
        raise FlagError(f"--num_repeats: {FLAGS.num_repeats} must be >= 1 and divide every batch size {batches}")
    if FLAGS.profile_dir is not None:
        cli.check_writable_dir("profile_dir", FLAGS.profile_dir)
    model_cfg, params, name = load_model()
    print(f"{name}: float32, prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, greedy, no early stop, "
          f"median of {FLAGS.repeats} after a warm-up; {jax.devices()[0].device_kind} x{jax.device_count()}")
    header = ("batch", "bucket", "prefill s", "prefill tok/s", "prefill GFLOP/s", "decode s", "decode tok/s",
              "ms/step", "decode GFLOP/s")
    print(" | ".join(header))
    rows = []
    for batch in batches:
        r = bench_batch(model_cfg, params, batch)
        rows.append(r)
        print(f"{r['batch']} | {r['bucket']} | {r['prefill_s']:.2f} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_gflop_s']:.1f} | {r['decode_s']:.2f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_ms_step']:.0f} | {r['decode_gflop_s']:.1f}", flush=True)
    out = {"model": name, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
           "num_repeats": FLAGS.num_repeats, "rows": rows}
    if FLAGS.compare_hf:
        if FLAGS.random_270m:
            raise FlagError("--compare_hf: needs a checkpoint both sides can load (drop --random_270m)")
        del params
        model_dir = str(cli.resolve_model_dir(FLAGS.model_dir))
        out["hf"] = [cli.run_reference_script("bench_hf_generate.py", "--model_dir", model_dir, "--batch", str(batch),
                                              "--prompt_len", str(FLAGS.prompt_len), "--new_tokens",
                                              str(FLAGS.new_tokens), "--repeats", str(FLAGS.repeats))
                     for batch in batches]
        for ours, hf in zip(rows, out["hf"], strict=True):
            ours["ratio_to_hf"] = ours["end_to_end_tok_s"] / hf["end_to_end_tok_s"]
            print(f"batch {ours['batch']}: ours {ours['end_to_end_tok_s']:.1f} tok/s end to end (prefill included), "
                  f"HF {hf['end_to_end_tok_s']:.1f}: {ours['ratio_to_hf']:.2f}x, same invocation")
    if FLAGS.json:
        import json

        print(json.dumps(out))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
