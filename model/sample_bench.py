"""Measuring the batched KV-cache sampler: prefill and decode throughput at one batch size (bin/bench_sample).

Method (BUILD.md "Sampler" has the numbers): one random prompt of `prompt_len` tokens (bos + ids drawn
with numpy seed 0, as in tests/bench_hf_generate.py, the HF transformers baseline) repeated over the batch;
greedy, no stop ids, so every row decodes the whole budget. Prefill and decode are separate jitted calls
(model.sampler.prefill, model.sampler.decode), compiled ahead of time, run once as a warm-up, then timed
`repeats` times (median):
- prefill tok/s = batch * prompt_len / prefill seconds (real tokens; the bucket pads the prompt to its
  quarter-octave bucket, `model.sampler.prompt_bucket`, and that padding is computed too);
- decode tok/s = batch * (new_tokens - 1) / decode seconds (prefill samples the first token, the while_loop
  the other new_tokens - 1);
- GFLOP/s = XLA's cost_analysis flops / seconds. cost_analysis counts a loop body once, so decode flops = the
  while_loop body's flops * (new_tokens - 1) (the body attends over all cache slots, as the real loop does), and
  prefill flops = its own count + (L - 1) * the flops of one decoder layer over the padded [batch, bucket].

Decode consumes (donates) its state, so every timed decode gets a fresh prefill.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from model import sampler
from model.config import GemmaConfig, get_preset
from model.forward import decoder_layer, layer_constants
from model.params import init_params
from model.sampling import SamplingConfig

# Which XLA:GPU command buffers (CUDA graphs) decode may compile with, besides the sampler's own setting
# ("default"): "while" adds while loops and conditionals, run on the device.
COMMAND_BUFFERS = {"off": "",
                   "while": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"}
BOS, FIRST_FREE_ID = 2, 4  # Gemma's <bos>; ids below 4 are pad / eos / bos / unk
GREEDY = SamplingConfig(temperature=0.0)
HEADER = ("batch", "check every", "command buffer", "bucket", "prefill s", "prefill tok/s", "prefill GFLOP/s",
          "decode s", "decode tok/s", "ms/step", "decode GFLOP/s")


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """What every measured call shares. Fields are bin/bench_sample's flags: a bad value is a ValueError naming it."""

    prompt_len: int  # tokens per prompt, bos included
    new_tokens: int  # generated tokens per row
    num_repeats: int = 1  # rows per distinct prompt sharing ONE prefill (GRPO's G)

    def __post_init__(self):
        if self.prompt_len < 2 or self.new_tokens < 2:  # bos + one id; prefill samples one token, decode the rest
            raise ValueError(f"--prompt_len and --new_tokens must be >= 2, got {self.prompt_len} and {self.new_tokens}")
        if self.num_repeats < 1:
            raise ValueError(f"--num_repeats must be >= 1, got {self.num_repeats}")
        sampler.check_fits(self.prompt_len, self.new_tokens, "prompt_len/--new_tokens")  # either shrinks the cache


def check_rows(batches: list[int], check_every: list[int], command_buffers: list[str], shape: SampleShape) -> None:
    """bin/bench_sample's table (a row per batch size x check_every x command buffer): a ValueError naming the flag
    unless each list has a value and every value is valid."""
    for flag, values in (("batch_sizes", batches), ("check_every", check_every), ("command_buffer", command_buffers)):
        if not values:
            raise ValueError(f"--{flag} is empty: give at least one value (one row per value)")
    for flag, values in (("batch_sizes", batches), ("check_every", check_every)):
        if min(values) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {','.join(map(str, values))}")
    unknown = [c for c in command_buffers if c != "default" and c not in COMMAND_BUFFERS]
    if unknown:
        raise ValueError(f"--command_buffer: unknown {unknown[0]!r}; choose from default, {', '.join(COMMAND_BUFFERS)}")
    if any(b % shape.num_repeats for b in batches):
        raise ValueError(f"--num_repeats: {shape.num_repeats} must divide every batch size {batches}")


@dataclasses.dataclass(frozen=True)
class Programs:
    """One batch's compiled prefill and decode with their inputs."""

    prefill: object  # jax Compiled
    decode: object  # jax Compiled
    args: tuple  # (params, tokens, pad, eos, key): prefill's inputs
    batch: int
    check_every: int
    command_buffer: str


def sample_dtype(name: str, backend: str) -> str:
    """A dtype name resolved for this backend (auto: float32 on CPU, where bf16 is slower; bfloat16 elsewhere):
    what bin/train would sample in."""
    if name != "auto":
        return name
    return "float32" if backend == "cpu" else "bfloat16"


def random_270m(dtype: str) -> tuple[GemmaConfig, dict]:
    """The gemma3-270m preset with random weights (key 0) in `dtype`."""
    model_cfg = get_preset("gemma3-270m")
    params = jax.jit(init_params, static_argnums=1)(jax.random.key(0), model_cfg)
    return model_cfg, jax.tree.map(lambda a: a.astype(dtype), params)


def decode_options(command_buffer: str) -> dict:
    """Compiler options for one command-buffer choice (added to the sampler's own)."""
    if command_buffer == "default":
        return {}
    return {"xla_gpu_enable_command_buffer": COMMAND_BUFFERS[command_buffer]}


def compile_batch(model_cfg: GemmaConfig, params: dict, batch: int, shape: SampleShape, check_every: int,
                  command_buffer: str) -> Programs:
    """Prefill and decode for `batch` rows, compiled ahead of time and run once (the warm-up)."""
    ids = np.random.default_rng(0).integers(FIRST_FREE_ID, model_cfg.vocab_size, shape.prompt_len - 1)
    prompts = [[BOS, *ids.tolist()]] * (batch // shape.num_repeats)
    tokens, pad = sampler.pad_prompts(prompts, model_cfg, shape.new_tokens)
    eos = sampler.stop_rule(model_cfg, ())  # no stop ids: every row decodes the full budget
    key = jax.random.key(0)
    prefill = sampler.prefill.lower(params, tokens, pad, eos, key, cfg=model_cfg, sampling=GREEDY,
                                    max_new_tokens=shape.new_tokens, repeats=shape.num_repeats).compile()
    state = prefill(params, tokens, pad, eos, key)
    decode = sampler.decode.lower(params, state, eos, cfg=model_cfg, sampling=GREEDY, check_every=check_every)
    options = decode_options(command_buffer)
    decode = decode.compile({**sampler.DECODE_COMPILER_OPTIONS, **options}) if options else decode.compile()
    jax.block_until_ready(decode(params, state, eos))  # warm-up (state is donated)
    return Programs(prefill, decode, (params, tokens, pad, eos, key), batch, check_every, command_buffer)


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _fresh_state(p: Programs):
    return jax.block_until_ready(p.prefill(*p.args))


def time_batch(p: Programs, repeats: int) -> tuple[list[float], list[float]]:
    """(prefill seconds, decode seconds) of `repeats` timed calls each."""
    params, eos = p.args[0], p.args[3]
    prefill_times, decode_times = [], []
    for _ in range(repeats):
        prefill_times.append(_seconds(lambda: p.prefill(*p.args)))
        state = _fresh_state(p)
        decode_times.append(_seconds(lambda: p.decode(params, state, eos)))  # noqa: B023 (called at once)
    return prefill_times, decode_times


def trace_decode(p: Programs, trace_dir: Path) -> None:
    """One decode traced with jax.profiler into trace_dir (grpo/profile_ops.py reads it back)."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    state = _fresh_state(p)
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    jax.block_until_ready(p.decode(p.args[0], state, p.args[3]))
    jax.profiler.stop_trace()


def prefill_flops(compiled, model_cfg: GemmaConfig, params: dict, tokens) -> float:
    """cost_analysis flops of prefill with its layer scan counted L times, not once."""
    lp, c = jax.tree.map(lambda a: a[0], (params["layers"], layer_constants(model_cfg)))
    x = jax.ShapeDtypeStruct((*tokens.shape, model_cfg.embed_dim), params["embed"].dtype)
    pos = jax.ShapeDtypeStruct(tokens.shape, np.int32)
    valid = jax.ShapeDtypeStruct(tokens.shape, bool)
    layer = jax.jit(decoder_layer, static_argnames="cfg").lower(lp, x, c, pos, valid, cfg=model_cfg).compile()
    return compiled.cost_analysis()["flops"] + (model_cfg.num_layers - 1) * layer.cost_analysis()["flops"]


def batch_row(p: Programs, model_cfg: GemmaConfig, shape: SampleShape, prefill_times: list[float],
              decode_times: list[float]) -> dict:
    """The report's row for one batch size and decode variant, from the medians of the timed calls."""
    t_prefill, t_decode = statistics.median(prefill_times), statistics.median(decode_times)
    steps, batch, tokens = shape.new_tokens - 1, p.batch, p.args[1]
    return {
        "batch": batch,
        "check_every": p.check_every,
        "command_buffer": p.command_buffer,
        "bucket": tokens.shape[1],
        "prefill_s": t_prefill,
        "prefill_tok_s": batch * shape.prompt_len / t_prefill,
        "prefill_gflop_s": prefill_flops(p.prefill, model_cfg, p.args[0], tokens) / t_prefill / 1e9,
        "decode_s": t_decode,
        "decode_tok_s": batch * steps / t_decode,
        "decode_ms_step": t_decode / steps * 1e3,
        "decode_gflop_s": p.decode.cost_analysis()["flops"] * steps / t_decode / 1e9,
        "end_to_end_tok_s": batch * shape.new_tokens / (t_prefill + t_decode),
    }


def format_row(r: dict) -> str:
    """One row of the console table (HEADER's columns)."""
    return (f"{r['batch']} | {r['check_every']} | {r['command_buffer']} | {r['bucket']} | {r['prefill_s']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['prefill_gflop_s']:.1f} | {r['decode_s']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_ms_step']:.2f} | {r['decode_gflop_s']:.1f}")


def compare_to_hf(rows: list[dict], batches: list[int], hf: list[dict]) -> list[str]:
    """hf: HF generate's result per batch size (in `batches` order). Sets the ratio_to_hf of each batch's first
    row (end-to-end tokens/s, ours / HF's, same invocation); returns the console lines."""
    first = {r["batch"]: r for r in reversed(rows)}
    lines = []
    for ours, theirs in zip((first[b] for b in batches), hf, strict=True):
        ours["ratio_to_hf"] = ours["end_to_end_tok_s"] / theirs["end_to_end_tok_s"]
        lines.append(f"batch {ours['batch']}: ours {ours['end_to_end_tok_s']:.1f} tok/s end to end (prefill "
                     f"included), HF {theirs['end_to_end_tok_s']:.1f} on {theirs.get('device', 'cpu')}: "
                     f"{ours['ratio_to_hf']:.2f}x, same invocation")
    return lines
