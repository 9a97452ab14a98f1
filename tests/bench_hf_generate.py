"""Baseline for bin/bench_sample: HF transformers greedy `generate` throughput, on the GPU when torch sees one
(else the CPU), in --dtype (float32 by default).

Not part of the test suite (needs the `reference` extra: torch + transformers). Run by hand, on the same
machine and in the same session as bin/bench_sample:

    python tests/bench_hf_generate.py                       # embedded Gemma 3 270M, batch 32, 150 + 128
    python tests/bench_hf_generate.py --model_dir DIR --batch 8 --new_tokens 64 --repeats 3

Method (mirrors bin/bench_sample): one random prompt of `--prompt_len` tokens (bos + ids drawn with numpy
seed 0), repeated `--batch` times, so HF needs no padding. EOS stopping is disabled so every row runs the
full budget. A logits processor stamps the clock each time generate has the logits of a new token, so
one generate(max_new_tokens=N) gives both: prefill = start to first stamp (prompt forward + unembed),
decode = first to last stamp (N - 1 single-token steps); decode tok/s = batch * (N - 1) / decode. After a
2-token warm-up, the median over `--repeats` runs is reported. HF runs with its
default attention (sdpa; Gemma 3 has no attention soft-cap, so sdpa is exact here) and its default
dynamic KV cache; torch uses all cores (`torch.get_num_threads()` is printed). On a GPU each clock stamp first
synchronises the device, so the stamps measure finished work (generate itself waits on the device every step
to decide whether to stop, so this adds little).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
except ImportError as e:
    raise SystemExit(f"bench_hf_generate needs torch + transformers (pip install -e '.[reference]'): {e}") from None

REPO = Path(__file__).resolve().parent.parent
BOS, FIRST_FREE_ID = 2, 4


def _default_model_dir() -> Path:
    sys.path.insert(0, str(REPO))
    from model.default_model import default_model_dir

    return Path(default_model_dir())


class _StepClock(LogitsProcessor):
    """Records when each new token's logits are ready; leaves the scores unchanged."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def _timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) of one greedy generate call."""
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate stopped early: {out.shape[1] - input_ids.shape[1]} of {new_tokens} tokens")
    return clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", type=Path, default=None, help="HF checkpoint dir (default: embedded 270M)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=150)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after the warm-up (median)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args()
    model_dir = args.model_dir or _default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"no config.json in {model_dir}; expected an HF checkpoint directory")
    if args.new_tokens < 2:
        raise SystemExit(f"--new_tokens must be >= 2 to time decode steps, got {args.new_tokens}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # no early stop: every row decodes the full budget
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(FIRST_FREE_ID, vocab, args.prompt_len - 1)
    prompt = torch.tensor([[BOS, *ids.tolist()]] * args.batch, dtype=torch.long, device=device)
    print(f"HF transformers generate: {model_dir.name}, {args.dtype} on {device}, batch {args.batch}, "
          f"prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"attention {model.config._attn_implementation}", flush=True)

    _timed_generate(model, prompt, 2)  # warm-up
    prefill, decode = [], []
    for _ in range(args.repeats):
        tp, td = _timed_generate(model, prompt, args.new_tokens)
        prefill.append(tp)
        decode.append(td)
        print(f"  prefill {tp:.2f} s, decode {td:.2f} s", flush=True)
    tp, td = statistics.median(prefill), statistics.median(decode)
    steps = args.new_tokens - 1
    print(f"prefill tok/s {args.batch * args.prompt_len / tp:.1f}")
    print(f"decode tok/s {args.batch * steps / td:.1f} ({td / steps * 1e3:.0f} ms/step)")
    if args.json:
        import json

        print(json.dumps({"batch": args.batch, "device": device, "dtype": args.dtype, "prefill_s": tp, "decode_s": td,
                          "prefill_tok_s": args.batch * args.prompt_len / tp, "decode_tok_s": args.batch * steps / td,
                          "end_to_end_tok_s": args.batch * args.new_tokens / (tp + td)}))


if __name__ == "__main__":
    main()
