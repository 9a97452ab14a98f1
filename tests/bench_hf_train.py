"""Baseline for bin/bench_train: one GRPO-shaped training step in HF transformers + torch, float32 weights, on the
GPU when torch sees one (there with bfloat16 autocast, as bin/train computes in bfloat16 off-CPU), else the CPU.

Not part of the test suite (needs the `reference` extra: torch + transformers). `bin/bench_train --compare_hf`
runs it in the same invocation, after our own steps, so the ratio comes from one sitting:

    python tests/bench_hf_train.py                          # embedded Gemma 3 270M, 16 rows x (160 + 128)
    python tests/bench_hf_train.py --rows 16 --prompt_len 160 --completion_len 128 --repeats 3 --json

Method (mirrors bin/bench_train's completion tail): random token ids (numpy seed 0), each group of
--num_generations rows with the same prompt columns (bench_train's batch; HF runs every row whole), full attention mask;
forward of the whole row, log-softmax of the logits at the completion positions only (the last
completion_len positions predict the completion tokens), loss = -mean(advantage x token log-prob) (GRPO's
token-mean policy loss at ratio 1), backward, AdamW step (lr 1e-6, as bench_train). HF's default attention
(sdpa) and torch's default threads. After one warm-up step, the median over --repeats steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import torch
    from transformers import AutoModelForCausalLM
except ImportError as e:
    raise SystemExit(f"bench_hf_train needs torch + transformers (pip install -e '.[reference]'): {e}") from None

REPO = Path(__file__).resolve().parent.parent


def _default_model_dir() -> Path:
    sys.path.insert(0, str(REPO))
    from model.default_model import default_model_dir

    return Path(default_model_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", type=Path, default=None, help="HF checkpoint dir (default: embedded 270M)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=160)
    parser.add_argument("--completion_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_generations", type=int, default=4, help="rows per shared prompt (bench_train's G)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    model_dir = args.model_dir or _default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    t = args.prompt_len + args.completion_len
    rng = np.random.default_rng(0)
    ids = min(1000, model.config.vocab_size)  # bench_train's ids, within a small vocabulary too
    raw = rng.integers(4, ids, (args.rows, t))
    g = args.num_generations  # bench_train's batch: each group of g rows shares its prompt columns
    raw[:, : args.prompt_len] = np.repeat(raw[::g, : args.prompt_len], g, axis=0)
    tokens = torch.tensor(raw, dtype=torch.long, device=device)
    advantages = torch.tensor(rng.normal(size=args.rows), dtype=torch.float32, device=device)
    mask = torch.ones_like(tokens)
    print(f"HF transformers train step: {model_dir.name}, float32{' + bf16 autocast' if on_gpu else ''} on {device}, "
          f"{args.rows} rows x {t} tokens "
          f"({args.completion_len} completion), torch threads {torch.get_num_threads()}", flush=True)

    def step() -> float:
        t0 = time.perf_counter()
        # logits for the positions that predict the completion tokens only (the tail), as bin/train does
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            out = model(input_ids=tokens, attention_mask=mask, logits_to_keep=args.completion_len + 1)
        logits = out.logits[:, :-1].float()  # [B, completion, V]
        logp = torch.log_softmax(logits, dim=-1)
        target = tokens[:, -args.completion_len:]
        token_logp = logp.gather(-1, target[..., None])[..., 0]  # [B, completion]
        loss = -(advantages[:, None] * token_logp).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = step()
    times = [step() for _ in range(args.repeats)]
    for i, s in enumerate(times):
        print(f"  step {i + 1}: {s:.2f} s", flush=True)
    med = statistics.median(times)
    print(f"HF step {med:.2f} s median of {args.repeats} (first step {first:.1f} s)")
    if args.json:
        print(json.dumps({"device": device, "step_s": med, "steps_s": times, "first_step_s": first, "rows": args.rows,
                          "prompt_len": args.prompt_len, "completion_len": args.completion_len}))


if __name__ == "__main__":
    main()
