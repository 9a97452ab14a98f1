"""Reference numbers for an imported Gemma checkpoint: HF transformers vs our JAX forward pass.

Not part of the suite (needs the `reference` extra: torch + transformers). Usage:

    python tests/reference_nll.py [CHECKPOINT_DIR]    # default: the embedded Gemma 3 270M

Prints the mean next-token NLL of a fixed sentence and the top-5 next tokens after
"<bos>Paris is the capital of", from HF (attn_implementation="eager", float32: sdpa skips Gemma 2's
attention soft-cap) and, when `model.forward` imports, from ours, with their differences. The two must
agree to 1e-3 (float32 on CPU; measured differences are ~1e-5).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NLL_TEXT = "The capital of Italy is Rome. The capital of France is Paris."
PROMPT = "Paris is the capital of"
TOLERANCE = 1e-3


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean over positions of -log p(ids[t+1] | ids[:t+1]); logits [T, V] float."""
    logits = logits[:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]]))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def hf_logits(path: str, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def jax_logits(path: str, ids: list[int]) -> np.ndarray | None:
    try:
        import jax.numpy as jnp

        from model import forward, load_hf_checkpoint
    except ImportError as e:
        print(f"(our forward pass is not importable: {e})")
        return None
    cfg, params = load_hf_checkpoint(path, dtype=jnp.float32)
    return np.asarray(forward(params, jnp.asarray([ids]), cfg)[0])


def _report(name: str, tok, nll: float, probs: np.ndarray) -> None:
    top = np.argsort(-probs)[:5]
    print(f"[{name}] mean NLL = {nll:.6f}")
    print(f"[{name}] top-5 after {PROMPT!r}: " + ", ".join(f"{tok.id_to_piece(i)!r} {probs[i]:.4f}" for i in top))


def main() -> int:
    from model.tokenizer import Tokenizer

    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from model.default_model import default_model_dir

        path = str(default_model_dir())
    tok = Tokenizer(path)
    nll_ids, prompt_ids = tok.encode(NLL_TEXT), tok.encode(PROMPT)
    results = {}
    for name, fn in (("hf", hf_logits), ("jax", jax_logits)):
        a, b = fn(path, nll_ids), fn(path, prompt_ids)
        if a is None:
            continue
        results[name] = (_nll(a, nll_ids), _softmax(b[-1]))
        _report(name, tok, *results[name])
    if "jax" in results:
        d_nll = abs(results["hf"][0] - results["jax"][0])
        d_p = float(np.abs(results["hf"][1] - results["jax"][1]).max())
        print(f"|NLL hf - jax| = {d_nll:.2e}; max |p hf - p jax| after the prompt = {d_p:.2e} (tolerance {TOLERANCE})")
        return 0 if max(d_nll, d_p) < TOLERANCE else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
