"""The Gemma tokenizer: a thin wrapper over a SentencePiece `tokenizer.model`.

Gemma ids: pad 0, eos 1, bos 2, unk 3; prompts start with bos. Chat turns end with `<end_of_turn>`, so a
sampler stops on eos or end_of_turn (`stop_ids`). `decode` drops bos and pad so that a left- or right-padded
row decodes to its text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

END_OF_TURN = "<end_of_turn>"
# A multimodal checkpoint's vocabulary carries a few rows more than its tokenizer (image tokens); a tokenizer
# of another model family differs by thousands.
MAX_EXTRA_VOCAB_ROWS = 1024


class Tokenizer:
    """`Tokenizer(path)` where path is a `tokenizer.model` file or a checkpoint directory holding one."""

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.model" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no SentencePiece tokenizer.model at {file}")
        self.file: Path = file  # copied next to exported checkpoints, so they load on their own
        self._sp = spm.SentencePieceProcessor(model_file=str(file))
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.vocab_size: int = self._sp.get_piece_size()
        self.end_of_turn_id: int | None = self.piece_to_id(END_OF_TURN)
        if self.bos_id < 0:
            # A tokenizer.model whose trainer_spec names other bos/eos pieces cannot add bos; say so now.
            raise ValueError(f"{file} defines no bos piece (bos_id() is -1); expected a Gemma tokenizer")
        self.stop_ids: tuple[int, ...] = tuple(
            i for i in (self.eos_id, self.end_of_turn_id) if i is not None and i >= 0
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        # Skip pad (left or right padding) and bos; other control ids decode to "" in SentencePiece anyway. Ids past
        # the tokenizer (a model may have up to MAX_EXTRA_VOCAB_ROWS more rows, and its sampler may pick one) have
        # no text: "" as in the stop automaton's table, where SentencePiece would raise.
        skip = {self.bos_id, self.pad_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in skip and 0 <= int(i) < self.vocab_size])

    def piece_texts(self) -> tuple[str, ...]:
        """What each id contributes to decoded text: "▁" as a space, byte pieces <0xNN> as their character
        (non-ASCII bytes as U+FFFD, which matches no ASCII stop string), control and unknown ids as ""."""
        sp, out = self._sp, []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                out.append("")
            elif sp.is_byte(i):
                byte = int(sp.id_to_piece(i)[3:-1], 16)
                out.append(chr(byte) if byte < 0x80 else "\ufffd")
            else:
                out.append(sp.id_to_piece(i).replace("\u2581", " "))
        return tuple(out)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when the vocabulary lacks it (SentencePiece would answer unk)."""
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else int(i)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def hf_tokenizer_files(tok: Tokenizer) -> dict[str, dict]:
    """tokenizer_config.json and generation_config.json for a checkpoint holding tok's tokenizer.model: without
    the first, transformers' AutoTokenizer reads the file with add_bos_token off, and Gemma without <bos> is
    another model; the second makes `generate` stop on the ids our sampler stops on."""
    piece = tok.id_to_piece
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id),
            "unk_token": piece(tok.unk_id),
        },
        "generation_config.json": {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids),
                                   "pad_token_id": tok.pad_id},
    }


def load_for_model(path: Path, model_cfg) -> Tokenizer:
    """The tokenizer file at `path`, checked against the model's vocabulary. Bad input: a ValueError naming
    --tokenizer (the flag every tool loads it by)."""
    if not path.is_file():
        raise ValueError(f"--tokenizer: no tokenizer file at {path}")
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"--tokenizer: {path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    if not 0 <= model_cfg.vocab_size - tok.vocab_size <= MAX_EXTRA_VOCAB_ROWS:
        raise ValueError(f"--tokenizer: {path} has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{model_cfg.vocab_size}: tokenizer and model do not match")
    return tok
