"""A complete tiny checkpoint directory for running the real binaries fast: random Gemma 3 weights with a
SentencePiece tokenizer trained here on Countdown text, so `bin/train --model_dir DIR` runs end to end in
seconds (the subprocess tests of kills, resume and bad input use it).
"""

from __future__ import annotations

import io
from pathlib import Path

import jax
import sentencepiece as spm

import model
from data import prompts
from data.puzzles import make_splits

VOCAB = 384  # small enough to train in a second, large enough for SentencePiece's Countdown pieces


def _corpus() -> list[str]:
    train, _ = make_splits(200, 0, seed=0)
    lines = [prompts.render("base", list(p.nums), p.target) for p in train]
    return lines + [f"<think> {p.solution} </think> <answer> {p.solution} </answer>" for p in train]


def train_tokenizer(path: Path, vocab_size: int = VOCAB) -> Path:
    """A SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and <end_of_turn>."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<end_of_turn>"],
        hard_vocab_limit=True, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """config.json + safetensors + tokenizer.model of a 2-layer random Gemma 3 with the tokenizer's vocabulary."""
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path / "tokenizer.model")
    cfg = model.tiny_config("gemma3", num_layers=2, vocab_size=VOCAB, embed_dim=32, hidden_dim=64, name="tiny-run")
    model.save_hf_checkpoint(path, cfg, model.init_params(jax.random.key(seed), cfg))
    return path
