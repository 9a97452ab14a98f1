"""The batched KV-cache sampler (model/sampler.py) and the sampling strategies (model/sampling.py).

References: the no-cache path (the full forward re-run on prompt + generated tokens, argmax every step),
HF transformers greedy `generate` (tests/fixtures/*/golden.npz, written by tests/make_fixtures.py), and a
float64 numpy implementation of temperature / top-k / top-p. Tiny random models (2 layers: one sliding, one
global; window 8 < the longest prompt), float32. Their norm weights are random and large so that greedy
paths move from token to token instead of repeating one token.

Compiles (~30, about 2.5 s each on the 2-core box) dominate the run time, so tests share shapes: 4 greedy or 16
sampled prompts in the 20-slot bucket with 10 new tokens wherever possible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import model
from model import sampler
from model.config import GLOBAL, SLIDING
from model.forward import attend
from model.params import map_schema
from model.sampling import SamplingConfig, nucleus_threshold, sample_tokens
from model.stop_text import match_start_table, stop_table

NEW = 10
PROMPT_LENGTHS = (20, 5, 13, 1)  # 20 and 13 exceed the window 8; 1 is bos alone; bucket 20
SAMPLING = SamplingConfig(temperature=0.7, top_k=5, top_p=0.8)
BOS, FIRST_FREE_ID = 2, 4
FIXTURES = Path(__file__).parent / "fixtures"


def _tiny(arch: str):
    """(cfg, params): a 2-layer tiny model with large random norm weights and q/k gain 2 (diverse outputs)."""
    extra = {"rope_scale_global": 8.0} if arch == "gemma3" else {}
    cfg = model.tiny_config(arch, num_layers=2, layer_types=(SLIDING, GLOBAL), **extra)
    rng = np.random.default_rng(0)  # numpy, not jax.random: building params then compiles nothing

    def leaf(path, spec):
        name = path[-1]
        if name.startswith("post"):  # scales each block's output up against the residual (tied embedding)
            value = 4.0 + 0.5 * rng.normal(size=spec.shape)
        elif "norm" in name:
            value = 0.2 + 0.4 * rng.normal(size=spec.shape)
        else:
            value = rng.normal(size=spec.shape) / np.sqrt(spec.fan_in) * (2.0 if name in ("q", "k") else 1.0)
        return jnp.asarray(value, jnp.float32)

    return cfg, map_schema(leaf, cfg)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request):
    return _tiny(request.param)


@pytest.fixture(scope="module")
def tiny2():
    return _tiny("gemma2")


def _prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(FIRST_FREE_ID, 256, n - 1).tolist()] for n in lengths]


@functools.partial(jax.jit, static_argnames="cfg")
def _padded_logits(params, tokens, length, cfg):
    """Full forward (no cache) over a right-padded [T] buffer whose first `length` tokens are real: [T, V]."""
    mask = jnp.arange(tokens.shape[0]) < length
    return model.forward(params, tokens[None], cfg, attention_mask=mask[None])[0]


BUFFER = 32 + NEW  # fixed reference buffer length: one compile per config


def _no_cache_greedy(params, cfg, prompt, steps):
    """Greedy tokens and raw log-softmax log-probs, recomputing the full forward every step."""
    seq, out, logps = list(prompt), [], []
    for _ in range(steps):
        buf = np.zeros(BUFFER, np.int32)
        buf[: len(seq)] = seq
        logits = np.asarray(_padded_logits(params, buf, len(seq), cfg)[len(seq) - 1], np.float64)
        token = int(np.argmax(logits))
        logps.append(logits[token] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
        out.append(token)
        seq.append(token)
    return np.array(out), np.array(logps)


def test_cached_greedy_equals_no_cache_path(tiny):
    """Reference: the no-cache argmax loop per prompt ALONE. Tokens exact; log-probs (log-softmax of the raw
    logits) within 4e-5 (float32 vs the same logits through the other path; 3.5e-6 measured on the CI CPU)."""
    cfg, params = tiny
    prompts = _prompts()
    result = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0, eos_ids=())
    assert result.tokens.shape == (4, NEW) and result.logprobs.shape == (4, NEW)
    assert len({t for row in result.tokens.tolist() for t in row}) > 8  # the model does not just repeat
    for row, prompt in enumerate(prompts):
        tokens, logps = _no_cache_greedy(params, cfg, prompt, NEW)
        np.testing.assert_array_equal(result.tokens[row], tokens, err_msg=f"row {row} (prompt length {len(prompt)})")
        np.testing.assert_allclose(result.logprobs[row], logps, atol=4e-5)
    np.testing.assert_array_equal(result.lengths, NEW)
    assert result.truncated.all()  # no EOS ids: every row runs the whole budget


def _golden_fixtures():
    return sorted(p for p in FIXTURES.glob("*") if (p / "golden.npz").is_file())


@pytest.mark.parametrize("fixture", _golden_fixtures() or [None], ids=lambda p: p.name if p else "missing")
def test_greedy_equals_hf_generate_on_golden_fixtures(fixture):
    """Reference: HF transformers greedy generate, eager float32, each prompt ALONE (golden.npz greedy_<i>,
    12 tokens, eos disabled). Ours runs all prompts of a fixture in ONE left-padded batch. Exact tokens."""
    if fixture is None:
        pytest.fail("tests/fixtures/*/golden.npz missing: run tests/make_fixtures.py")  # committed: never skip
    cfg, params = model.load_hf_checkpoint(fixture)
    golden = np.load(fixture / "golden.npz")
    new_tokens = json.loads((fixture / "golden.json").read_text())["new_tokens"]
    count = len([k for k in golden.files if k.startswith("tokens_")])
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(count)]
    result = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=new_tokens, temperature=0,
                            eos_ids=())
    for i in range(count):
        np.testing.assert_array_equal(result.tokens[i], golden[f"greedy_{i}"], err_msg=f"{fixture.name} prompt {i}")


def _reference_logprobs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """float64 log-probs of the sampling distribution (temperature, top-k, then nucleus); -inf outside it."""
    z = np.asarray(logits, np.float64) / cfg.temperature
    if cfg.top_k is not None:
        z = np.where(z >= np.sort(z)[-cfg.top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p is not None:
        above = np.array([p[p > pi].sum() for pi in p])  # mass of strictly more likely tokens
        p = np.where(above < cfg.top_p, p, 0.0)
        p /= p.sum()
    with np.errstate(divide="ignore"):
        return np.log(p)


SAMPLED_LENGTHS = (9, 20, 3, 14, 1, 17, 6, 11, 2, 16, 8, 19, 4, 12, 10, 5)  # 16 rows, bucket 20


def _sample(tiny2, prompts, seed):
    cfg, params = tiny2
    return model.generate(params, cfg, prompts, jax.random.key(seed), max_new_tokens=NEW, eos_ids=(),
                          temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p)


@pytest.fixture(scope="module")
def sampled(tiny2):
    """16 prompts sampled with SAMPLING and key 7: (prompts, result). Shared so the batch compiles once."""
    prompts = _prompts(SAMPLED_LENGTHS, seed=5)
    return prompts, _sample(tiny2, prompts, 7)


def test_sampled_tokens_lie_in_the_allowed_set_with_their_logprobs(tiny2, sampled):
    """Reference: the teacher-forced no-cache forward over prompt + completion, then the float64 sampling
    distribution. Every sampled token (16 rows x 10) is inside top-k / top-p; its log-prob matches within 8e-5."""
    cfg, params = tiny2
    prompts, result = sampled
    for row, prompt in enumerate(prompts):
        buf = np.zeros(BUFFER, np.int32)
        seq = prompt + result.tokens[row].tolist()
        buf[: len(seq)] = seq
        logits = np.asarray(_padded_logits(params, buf, len(seq), cfg))
        for j, token in enumerate(result.tokens[row]):
            ref = _reference_logprobs(logits[len(prompt) - 1 + j], SAMPLING)
            assert np.isfinite(ref[token]), f"row {row} step {j}: token {token} is outside the top-k/top-p set"
            np.testing.assert_allclose(result.logprobs[row, j], ref[token], atol=8e-5)  # 7.6e-6 measured (CI CPU)


def test_a_row_does_not_depend_on_other_rows_or_its_padding(tiny2, sampled):
    """Reference: the same prompt sampled (a) alone (batch 1, bucket 16) vs as row 0 of the batch of 16 (bucket
    20, 4 more padding slots), and (b) as row 9 of two batches of 16 whose other rows all differ (prefill runs 8
    rows at a time, so row 9 shares its group with 7 different prompts). Same key: identical tokens, log-probs
    within 1e-5. (Row r draws with fold_in(key, r), so a prompt is compared at the same index.)"""
    prompts, batch = sampled
    others = _prompts(SAMPLED_LENGTHS[::-1], seed=6)
    others[9] = prompts[9]
    alone, mixed = _sample(tiny2, prompts[:1], 7), _sample(tiny2, others, 7)
    np.testing.assert_array_equal(batch.tokens[0], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[0], alone.logprobs[0], atol=1e-5)
    np.testing.assert_array_equal(batch.tokens[9], mixed.tokens[9])
    np.testing.assert_allclose(batch.logprobs[9], mixed.logprobs[9], atol=1e-5)
    assert (batch.tokens[8] != mixed.tokens[8]).any()  # the neighbours really differ


def test_shared_prefill_equals_repeated_prompts(tiny2):
    """num_repeats=G prefills each prompt once and replicates its cache rows. Reference: the same 4 prompts each
    written out 4 times (16 rows, 16 prefills), same key: identical tokens, log-probs within 1e-5 (the rows'
    prefill arithmetic may be grouped differently); rows of one prompt still draw different samples."""
    cfg, params = tiny2
    unique = _prompts(SAMPLED_LENGTHS[:4], seed=5)
    expanded = [p for p in unique for _ in range(4)]
    written_out = _sample(tiny2, expanded, 7)
    shared = model.generate(params, cfg, unique, jax.random.key(7), max_new_tokens=NEW, eos_ids=(),
                            temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
                            num_repeats=4)
    np.testing.assert_array_equal(shared.tokens, written_out.tokens)
    np.testing.assert_allclose(shared.logprobs, written_out.logprobs, atol=1e-5)
    assert (shared.tokens[0] != shared.tokens[1]).any() or (shared.tokens[0] != shared.tokens[2]).any()
    with pytest.raises(ValueError, match="num_repeats"):
        model.generate(params, cfg, unique, jax.random.key(7), max_new_tokens=NEW, num_repeats=0)


def test_same_key_same_samples_other_key_other_samples(tiny2, sampled):
    """Reference: the sampler itself. Same key -> bit-identical tokens and log-probs; another key -> the 160
    sampled tokens differ somewhere."""
    prompts, first = sampled
    again, other = _sample(tiny2, prompts, 7), _sample(tiny2, prompts, 8)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert (first.tokens != other.tokens).any()


def test_eos_stops_a_row_and_the_rest_is_padding(tiny2):
    """Reference: the same greedy run without EOS ids. With eos = a token row 0 first emits at step j >= 1,
    every row stops at its first EOS: tokens kept up to it, then pad 0 and log-prob 0; lengths count the EOS."""
    cfg, params = tiny2
    prompts = _prompts()
    free = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0, eos_ids=())
    row0 = free.tokens[0].tolist()
    j = next(i for i in range(1, NEW) if row0[i] not in row0[:i])
    eos = row0[j]
    traces = sampler.TRACE_COUNTS["decode"]
    stopped = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0,
                             eos_ids=(eos, 1))
    assert sampler.TRACE_COUNTS["decode"] == traces  # the stop ids are traced, not static
    for row in range(len(prompts)):
        hits = np.flatnonzero(free.tokens[row] == eos)
        n = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(stopped.tokens[row, :n], free.tokens[row, :n])
        np.testing.assert_array_equal(stopped.tokens[row, n:], 0)
        np.testing.assert_array_equal(stopped.logprobs[row, n:], 0.0)
        np.testing.assert_allclose(stopped.logprobs[row, :n], free.logprobs[row, :n], atol=1e-6)
        assert stopped.lengths[row] == n
        assert stopped.truncated[row] == (not hits.size)
    assert stopped.lengths[0] == j + 1


def test_stop_string_ends_a_row_inside_the_loop(tiny2):
    """Reference: the same greedy run without stops, its text searched on the host. Every token decodes to a
    distinct piece "<id>"; the stop string spans two tokens of row 0's completion, so matching must cross a
    token boundary. Each row stops at the token that first completes the string, as an EOS would."""
    cfg, params = tiny2
    prompts = _prompts()
    free = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0, eos_ids=())
    pieces = [f"<{i}>" for i in range(cfg.vocab_size)]
    row0 = free.tokens[0].tolist()
    stop = pieces[row0[2]][1:] + pieces[row0[3]][:-1]  # "12><34": the end of one piece and the start of the next
    table = stop_table(pieces, stop)
    traces = sampler.TRACE_COUNTS["decode"]
    stopped = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0,
                             eos_ids=(), stop_table=table)
    other = stop_table(pieces, stop[::-1])  # another stop string of the same length: no recompile
    model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0, eos_ids=(),
                   stop_table=other)
    assert sampler.TRACE_COUNTS["decode"] == traces + 1  # only a new table height (no stop -> a stop) compiles
    for row in range(len(prompts)):
        texts = ["".join(pieces[t] for t in free.tokens[row, : k + 1]) for k in range(NEW)]
        n = next((k + 1 for k, text in enumerate(texts) if stop in text), NEW)
        np.testing.assert_array_equal(stopped.tokens[row, :n], free.tokens[row, :n])
        np.testing.assert_array_equal(stopped.tokens[row, n:], cfg.pad_id)
        assert stopped.lengths[row] == n and stopped.truncated[row] == (n == NEW and stop not in texts[-1])
    assert stopped.lengths[0] <= 4


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.text("ab<>/", max_size=4), min_size=1, max_size=6), st.lists(st.integers(0, 5), max_size=12),
       st.text("ab<>/", min_size=1, max_size=4))
@example(list("</answer>"), list(range(9)), "</answer>")  # one character per token: every state in turn
@example(["</answer", ">"], [0, 1], "</answer>")  # the last step, len - 1 -> len (the 270M's "</" "answer" ">")
@example(["x<", "/think>", "\n"], [0, 1, 2], "</think>")  # the match begins inside a token (match_start_table)
@example(["</think>\n", "a"], [1, 0], "</think>")  # ... and ends inside one
def test_stop_table_matches_a_substring_search(pieces, ids, stop):
    """Reference: `stop in text` on the host, after every token. The automaton reaches len(stop) at the first
    token whose text completes the stop string, and never before; there, match_start_table says how many of the
    match's characters came before that token (the text's length before it minus where the match begins)."""
    ids = [i % len(pieces) for i in ids]
    table, back, state, text = stop_table(pieces, stop), match_start_table(pieces, stop), 0, ""
    for i in ids:
        prev, before = state, text
        state, text = int(table[prev, i]), text + pieces[i]
        assert (state == len(stop)) == (stop in text)
        if state == len(stop):
            assert back[prev, i] == max(0, len(before) - text.find(stop))
            break


def test_ids_past_the_tokenizer_add_no_text():
    """Reference: Tokenizer.decode, which drops ids past the tokenizer's pieces. In the sampler's table (padded to
    the model's vocabulary) such an id leaves a partial match as it is, as think_forcing's pieces ("") do."""
    cfg = model.tiny_config("gemma3")
    pieces = ["<", "/", "x", ">"]
    table = np.asarray(sampler.stop_rule(cfg, (), stop_table(pieces, "</x>")).text_table)
    assert table.shape == (4, cfg.vocab_size)
    state = 0
    for i in (0, 1, 200, 2, cfg.vocab_size - 1, 3):  # "</x>" with two ids past the pieces in between
        state = int(table[state, i]) if state < 4 else state
    assert state == 4


def test_stop_and_pad_ids_default_to_the_config(tiny2):
    """Reference: the same greedy run with explicit eos_ids=(eos,). With eos_ids left out, generate stops on
    cfg.eos_id, and both the prompt padding and a finished row's tokens are cfg.pad_id (3 here, not 0)."""
    cfg, params = tiny2
    prompts = _prompts()
    free = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0, eos_ids=())
    row0 = free.tokens[0].tolist()
    eos = row0[next(i for i in range(1, NEW) if row0[i] not in row0[:i])]
    explicit = model.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0,
                              eos_ids=(eos,))
    custom = dataclasses.replace(cfg, eos_id=eos, pad_id=3)
    tokens, pad = sampler.pad_prompts(prompts, custom, NEW)
    assert (tokens[1, : pad[1]] == 3).all() and pad[1] > 0
    default = model.generate(params, custom, prompts, jax.random.key(0), max_new_tokens=NEW, temperature=0)
    np.testing.assert_array_equal(default.lengths, explicit.lengths)
    np.testing.assert_array_equal(default.truncated, explicit.truncated)
    after_stop = np.arange(NEW)[None, :] >= explicit.lengths[:, None]  # [B, NEW]
    assert after_stop.any()
    np.testing.assert_array_equal(default.tokens, np.where(after_stop, 3, explicit.tokens))
    np.testing.assert_allclose(default.logprobs, explicit.logprobs, atol=1e-6)


def test_decode_asks_the_host_once_per_block_of_steps(tiny2):
    """Reference: XLA's compiled HLO of the jitted decode (greedy). The token loop is two while loops: the outer one
    stops on data (all rows done), the inner one runs CHECK_EVERY steps and XLA knows its trip count (a GPU
    then runs it without copying a predicate to the host). No other while loop (the layers are unrolled), so
    there is no per-token host round trip."""
    cfg, params = tiny2
    tokens, pad = sampler.pad_prompts(_prompts(), cfg, NEW)
    eos = sampler.stop_rule(cfg, ())
    greedy = SamplingConfig(temperature=0)
    state = jax.eval_shape(lambda: sampler.prefill(params, tokens, pad, eos, jax.random.key(0), cfg=cfg,
                                                   sampling=greedy, max_new_tokens=NEW))
    text = sampler.decode.lower(params, state, eos, cfg=cfg, sampling=greedy).compile().as_text()
    loops = [line for line in text.splitlines() if " while(" in line]
    counts = [re.search(r'known_trip_count":\{"n":"(\d+)"', line) for line in loops]
    assert len(loops) == 2
    assert sorted(int(c.group(1)) if c else 0 for c in counts) == [0, min(sampler.CHECK_EVERY, NEW)]


def test_compiles_once_per_prompt_bucket(tiny2):
    """Reference: trace counters inside the jitted prefill and decode. Six batches whose longest prompts fall
    in two buckets (16 and 32) compile each function exactly twice (3 new tokens: shapes no other test uses)."""
    cfg, params = tiny2
    buckets = [sampler.prompt_bucket(n) for n in (1, 16, 17, 29, 32, 33, 129, 150, 256, 257)]
    assert buckets == [16, 16, 20, 32, 32, 40, 160, 160, 256, 320]  # quarter-octave steps
    before = dict(sampler.TRACE_COUNTS)
    for lengths in [(3, 7), (16, 2), (9, 11), (29, 5), (32, 31), (1, 30)]:
        result = model.generate(params, cfg, _prompts(lengths), jax.random.key(0), max_new_tokens=3, temperature=0)
        assert result.tokens.shape == (2, 3)
    assert sampler.TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 2
    assert sampler.TRACE_COUNTS["decode"] - before.get("decode", 0) == 2


@pytest.mark.parametrize("layout", ["cpu", "accelerator"])
def test_decode_attend_equals_attend(layout):
    """Reference: model.forward.attend over the cache slots plus the new token's key. Gemma 2 soft-cap, G=2,
    window 8, left padding and unwritten slots masked; within 1e-5, in both decode layouts (the accelerator's
    traced here on CPU)."""
    from model.decode_attention import decode_attend
    from model.forward import compiling_for_accelerator
    cfg = model.tiny_config("gemma2")
    b, s, kh, n, h = 3, 12, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    rng = np.random.default_rng(0)  # numpy inputs: eager jax ops would each compile
    q = rng.normal(size=(b, 1, n, h)).astype(np.float32) * 4
    k_cache, v_cache = rng.normal(size=(2, b, kh, s, h)).astype(np.float32)
    k_new, v_new = rng.normal(size=(2, b, kh, 1, h)).astype(np.float32)
    pad = np.array([0, 3, 7])
    slot = 10  # the new token's slot: slots >= 10 are unwritten
    k_pos = (np.arange(s)[None, :] - pad[:, None]).astype(np.int32)
    k_valid = (k_pos >= 0) & (np.arange(s)[None, :] < slot)
    q_pos = k_pos[:, slot:slot + 1]
    window = np.int32(8)
    if layout == "accelerator":
        jax.clear_caches()  # the layout is chosen while tracing: no trace of the CPU layout may be reused
    with compiling_for_accelerator() if layout == "accelerator" else contextlib.nullcontext():
        got = jax.jit(decode_attend, static_argnames="cfg")(
            q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid, window, cfg=cfg
        )

    @jax.jit
    def reference(q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid):
        k_all = jnp.concatenate([k_cache, k_new], axis=2).transpose(0, 2, 1, 3)  # [B, S+1, K, H]
        v_all = jnp.concatenate([v_cache, v_new], axis=2).transpose(0, 2, 1, 3)
        pos_all = jnp.concatenate([k_pos, q_pos], axis=1)
        valid_all = jnp.concatenate([k_valid, jnp.ones((b, 1), bool)], axis=1)
        return attend(q, k_all, v_all, q_pos, pos_all, valid_all, window, cfg)

    np.testing.assert_allclose(got, reference(q, k_cache, v_cache, k_new, v_new, q_pos, k_pos, k_valid), atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(1.0), SamplingConfig(1.0, top_k=5), SamplingConfig(1.0, top_p=0.6),
     SamplingConfig(0.5, top_k=12, top_p=0.9)],
    ids=["plain", "top_k", "top_p", "all"],
)
def test_sample_tokens_statistics(cfg):
    """Reference: the float64 sampling distribution of fixed logits (V = 40). 20000 rows drawn in one call (a
    row's draw uses fold_in(key, row)): no token outside the allowed set, ever; every token's frequency within
    5 standard errors (+ 1/N) of its probability; log-probs equal the reference within 1e-5."""
    logits = np.random.default_rng(0).normal(size=40).astype(np.float32) * 2
    n = 20_000
    tokens, logprobs = jax.jit(sample_tokens, static_argnums=2)(
        np.broadcast_to(logits, (n, 40)), jax.random.key(1), cfg
    )
    ref = _reference_logprobs(logits, cfg)
    tokens = np.asarray(tokens)
    assert np.isfinite(ref[tokens]).all()
    freq = np.bincount(tokens, minlength=40) / n
    p = np.exp(ref)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1 / n).all()
    np.testing.assert_allclose(np.asarray(logprobs), ref[tokens], atol=1e-5)


def test_two_level_inverse_cdf_across_blocks():
    """Reference: softmax of fixed logits over V = 1300 (three 512-token blocks, the last one padded). The
    mass of each 100-token bin from 20000 draws is within 5 standard errors of the exact mass."""
    logits = np.random.default_rng(2).normal(size=1300).astype(np.float32)
    n = 20_000
    tokens, _ = jax.jit(sample_tokens, static_argnums=2)(
        np.broadcast_to(logits, (n, 1300)), jax.random.key(3), SamplingConfig(1.0)
    )
    p = np.exp(logits - logits.max())
    p /= p.sum()
    bins = np.asarray(tokens) // 100
    freq = np.bincount(bins, minlength=13) / n
    mass = p.reshape(13, 100).sum(axis=1)
    assert (np.abs(freq - mass) <= 5 * np.sqrt(mass * (1 - mass) / n)).all()


def test_nucleus_keeps_ties_together():
    """Reference: the rule 'keep token i iff the mass of strictly more likely tokens < top_p', by hand."""
    probs = np.array([[0.4, 0.2, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    t = np.asarray(jax.jit(nucleus_threshold, static_argnums=1)(probs.astype(np.float32), 0.5))
    kept = probs.astype(np.float32) >= t[:, None]
    np.testing.assert_array_equal(kept, [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[2, 5], []]), "prompt 1"),
        (dict(prompts=[[2, 999]]), "outside"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[2] * 32_768], max_new_tokens=1), "exceed the 32768-token context"),
        (dict(eos_ids=(-1,)), "eos_ids"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(kwargs, message):
    """Reference: generate's edge validation; nothing is compiled for bad input."""
    cfg = model.tiny_config("gemma2")
    args = dict(prompts=[[2, 5, 6]], max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, eos_ids=(1,))
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=message) as info:
        model.generate({}, cfg, prompts, jax.random.key(0), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("layout", ["cpu", "accelerator"])
@pytest.mark.parametrize("case", ["greedy_gemma3", "sampled_gemma3", "nucleus_gemma2"])
def test_tokens_equal_the_fixture_of_the_earlier_loop(case, layout):
    """Reference: tests/fixtures/sampler_tokens.npz, written by tests/sampler_fixture.py with the decode loop as it
    was before it checked for finished rows only every few steps. Greedy and sampled rows, early stops at
    "</answer>" (one piece or two) and at an EOS id, rows that use the whole budget: identical tokens, lengths
    and truncation; log-probs within 1e-5 (float32 arithmetic may be grouped differently)."""
    from sampler_fixture import PATH, run_case

    from model.forward import compiling_for_accelerator

    golden = np.load(PATH)
    if layout == "accelerator":
        jax.clear_caches()  # the layout is chosen while tracing: no trace of the CPU layout may be reused
    with compiling_for_accelerator() if layout == "accelerator" else contextlib.nullcontext():
        result = run_case(case, golden[f"{case}/stop_ids"], int(golden[f"{case}/eos"]))
    lengths = golden[f"{case}/lengths"]
    assert 0 < lengths.min() and lengths.min() < lengths.max() == NEW_FIXTURE  # early stops and full rows
    np.testing.assert_array_equal(result.tokens, golden[f"{case}/tokens"])
    np.testing.assert_array_equal(result.lengths, lengths)
    np.testing.assert_array_equal(result.truncated, golden[f"{case}/truncated"])
    np.testing.assert_allclose(result.logprobs, golden[f"{case}/logprobs"], atol=1e-5)


NEW_FIXTURE = 24  # tests/sampler_fixture.py's budget
