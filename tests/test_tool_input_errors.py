"""Bad input to the tools other than bin/train: the library checks behind their flags (in this process), and the
cases test_bad_flags.py's one-flag table cannot state (a message's content, several flags, a directory that must
not be made, a model with a tokenizer) as subprocesses, each failing before a model loads.

Reference: the project's rule for bad input (bin/cli.py: ONE line `error: --flag: ...`, exit status 2, nothing
compiled or written first) and, for each check made ahead of time, the later check it stands in for:
model.sampler.pad_prompts (the sampler's context), grpo.fsdp_forward.check_rows (a batch over the mesh), the
puzzle generator's own failure (the space of a PuzzleConfig). Exact comparisons; no timing is asserted.
"""

from __future__ import annotations

import importlib.util
import re
import types

import pytest
from binaries import ROOT, run_tool

from data import curriculum, puzzles
from data.puzzles import PuzzleConfig, check_splits, make_splits, max_puzzles
from grpo import grpo_bench, program_inspect, train_bench
from grpo.fsdp_forward import check_rows
from model import sample_bench, sampler
from model.config import PRESETS, named_config, tiny_config

TINY = ROOT / "tests" / "fixtures" / "gemma3_g2"  # a checkpoint without tokenizer.model


def _one_line_error(result, flag: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(rf"--{flag}\b", lines[0]) and "Traceback" not in result.stdout + result.stderr, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


# --- the library checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 16, 17, 150, 4000])
def test_check_fits_refuses_exactly_what_pad_prompts_refuses(prompt_len):
    cfg = tiny_config("gemma3")
    budget = sampler.MAX_CACHE_LEN - sampler.prompt_bucket(prompt_len)  # the most that fits
    for new_tokens, fits in ((budget, True), (budget + 1, False)):
        try:
            sampler.pad_prompts([[1] * prompt_len], cfg, new_tokens)
            assert fits
        except ValueError:
            assert not fits
        if fits:
            sampler.check_fits(prompt_len, new_tokens)
        else:
            with pytest.raises(ValueError, match=rf"^--new_tokens: {new_tokens} new tokens after a {prompt_len}-token"):
                sampler.check_fits(prompt_len, new_tokens, flag="new_tokens")


@pytest.mark.parametrize("kwargs,field", [
    (dict(counts=(5,)), "counts"), (dict(counts=()), "counts"), (dict(num_min=0), "num_min"),
    (dict(num_min=5, num_max=4), "num_min"), (dict(target_min=9, target_max=8), "target_min"),
    (dict(num_max=10**6), "num_max"), (dict(max_draws=0), "max_draws"),
])  # fmt: skip
def test_puzzle_config_messages_start_with_the_field(kwargs, field):
    """bin/make_dataset prefixes "--": the field is the flag. The class stays named for library users."""
    with pytest.raises(ValueError, match=rf"^{field}\b.*PuzzleConfig"):
        PuzzleConfig(**kwargs)


def test_max_puzzles_counts_multisets_times_targets():
    cfg = PuzzleConfig(counts=(2, 3), num_min=1, num_max=9, target_min=1, target_max=18)
    multisets = len({tuple(sorted((a, b))) for a in range(1, 10) for b in range(1, 10)})
    multisets += len({tuple(sorted((a, b, c))) for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)})
    assert max_puzzles(cfg) == multisets * 18 == (45 + 165) * 18


def test_an_impossible_split_fails_before_drawing(monkeypatch):
    """The tester's two inputs, which drew a million puzzles (or spent max_draws) before failing."""
    monkeypatch.setattr(puzzles, "_stream", lambda *a: pytest.fail("drew puzzles"))
    unreachable = PuzzleConfig(counts=(2,), num_max=5, target_min=1000, target_max=1001)
    with pytest.raises(ValueError, match=r"^target_max 1001 is out of reach: 2 numbers in 1\.\.5 make at most 25"):
        make_splits(10, 10, 0, unreachable)
    small = PuzzleConfig(counts=(2,), num_max=3, target_min=1, target_max=6)
    with pytest.raises(ValueError, match=r"^num_test 1000 is more than the 36 distinct puzzles"):
        make_splits(10, 1000, 0, small)
    with pytest.raises(ValueError, match="out of reach"):
        puzzles.generate(1, 0, PuzzleConfig(counts=(3, 2), num_max=4, target_min=1, target_max=17))  # 4**2 = 16


def test_every_level_of_every_ladder_passes_the_new_checks():
    """The up-front checks must not refuse a configuration the generator serves (held-out sets of 16)."""
    for name in curriculum.LADDERS:
        for level in curriculum.ladder(name):
            check_splits(16, level.puzzles)


def test_named_config_lists_every_name_it_accepts():
    with pytest.raises(ValueError, match="unknown preset 'nope'") as e:
        named_config("nope")
    listed = str(e.value).split("known: ")[1].split(", ")
    assert set(PRESETS) < set(listed) and {"tiny-gemma2", "tiny-gemma3"} < set(listed)
    assert all(named_config(name) for name in listed)
    with pytest.raises(ValueError, match="unknown preset 'tiny-foo'"):
        named_config("tiny-foo")


@pytest.mark.parametrize("batches,every,buffers,flag", [
    ([], [8], ["default"], "batch_sizes"), ([1], [], ["default"], "check_every"), ([1], [8], [], "command_buffer"),
    ([0], [8], ["default"], "batch_sizes"), ([1], [0], ["default"], "check_every"),
    ([1], [8], ["nope"], "command_buffer"), ([2, 3], [8], ["default"], "num_repeats"),
])  # fmt: skip
def test_bench_sample_rows_name_the_flag(batches, every, buffers, flag):
    with pytest.raises(ValueError, match=rf"^--{flag}\b"):
        sample_bench.check_rows(batches, every, buffers, sample_bench.SampleShape(150, 128, num_repeats=2))
    sample_bench.check_rows([2, 4], [1, 8], ["default", "off", "while"], sample_bench.SampleShape(150, 128, 2))


def test_bench_sample_shape_fits_the_sampler():
    for prompt_len, new_tokens in ((40_000, 128), (150, 40_000), (1, 128), (150, 1)):
        with pytest.raises(ValueError, match=r"^--prompt_len\b.*--new_tokens\b"):
            sample_bench.SampleShape(prompt_len, new_tokens)
    sample_bench.SampleShape(sampler.MAX_CACHE_LEN // 2, sampler.MAX_CACHE_LEN // 2)  # a bucket of its own length


@pytest.mark.parametrize("tails", [["foo"], [], ["0", "0"], ["0", "tail"]])
def test_bench_train_tails_are_the_valid_ones(tails):
    with pytest.raises(ValueError, match=r"^--tails: give one or both of 0, completion"):
        train_bench.check_tails(tails, compare_hf=False)
    for good in (["0"], ["completion"], ["completion", "0"]):
        train_bench.check_tails(good, compare_hf="completion" in good)
    with pytest.raises(ValueError, match="^--compare_hf"):
        train_bench.check_tails(["0"], compare_hf=True)


def _inspect_options(what: str, batch: int, data: int, fsdp: int, micro: int) -> program_inspect.InspectOptions:
    return program_inspect.InspectOptions(
        what=what, batch=batch, seq_len=64, mesh=f"data={data},fsdp={fsdp}", data=data, fsdp=fsdp, dtype="float32",
        param_dtype=None, compute_dtype=None, lora_cfg=None, num_micro_batches=micro, remat=False, beta=0.0,
        num_generations=1, shared_prompt=False, logits_chunk=16, logprob_tail=None)


@pytest.mark.parametrize("what", ["step", "logprobs"])
def test_inspect_batch_layout_is_refused_as_the_step_would(what):
    """InspectOptions refuses exactly the batches grpo.fsdp_forward.check_rows refuses while lowering."""
    for batch, data, fsdp, micro in [(b, d, f, m) for b in range(1, 13) for d, f in ((3, 1), (1, 2), (2, 2))
                                     for m in (1, 2)]:
        try:
            check_rows(batch, types.SimpleNamespace(size=data * fsdp), micro, what)
            _inspect_options(what, batch, data, fsdp, micro)
        except ValueError as e:
            assert str(e).startswith(f"{what}: batch of"), e  # check_rows refused; InspectOptions must too
            with pytest.raises(ValueError, match=rf"^--batch {batch} must be a multiple of the --mesh's"):
                _inspect_options(what, batch, data, fsdp, micro)
    _inspect_options("forward", 5, 3, 1, 1)  # forward runs on one device


def test_bench_grpo_tokenizer_is_named_by_model_dir(tiny_model_dir):
    import model

    bench = grpo_bench.BenchConfig(prompts=1, num_generations=2, repeats=1)
    with pytest.raises(ValueError, match=r"^--model_dir: no tokenizer file at .*tokenizer\.model$"):
        grpo_bench.load_tokenizer(TINY, model.load_config(TINY), bench)
    cfg = model.load_config(tiny_model_dir)
    assert grpo_bench.load_tokenizer(tiny_model_dir, cfg, bench).vocab_size <= cfg.vocab_size
    with pytest.raises(ValueError, match=r"^--max_new_tokens: 100000 new tokens after a \d+-token prompt"):
        grpo_bench.load_tokenizer(tiny_model_dir, cfg, grpo_bench.BenchConfig(max_new_tokens=100_000))
    # the run's configs and its rows, before the weights load (they failed after, with a traceback)
    with pytest.raises(ValueError, match="^--beta must be a finite number >= 0, got nan"):
        grpo_bench.load_tokenizer(tiny_model_dir, cfg, grpo_bench.BenchConfig(beta=float("nan")))
    with pytest.raises(ValueError, match="^--num_micro_batches: 4 x 4 rows do not split over 2 device"):
        grpo_bench.load_tokenizer(tiny_model_dir, cfg, grpo_bench.BenchConfig(num_micro_batches=3), devices=2)


# --- the binaries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool,args", [
    ("sample", ["--prompt=hi"]),
    ("pass_at_k", ["--k=1", "--eval_size=1", "--levels=2x1-9"]),
    ("bench_grpo", ["--prompts=1", "--num_generations=2", "--repeats=1"]),
])  # fmt: skip
def test_a_budget_past_the_context_is_refused_before_the_weights_load(tool, args, tiny_model_dir):
    line = _one_line_error(run_tool(tool, f"--model_dir={tiny_model_dir}", "--max_new_tokens=100000", *args),
                           "max_new_tokens")
    assert "exceed the 32768-token context" in line


@pytest.mark.parametrize("tool,args", [
    ("sample", ["--prompt=hi"]),
    ("pass_at_k", ["--k=1", "--eval_size=1", "--levels=2x1-9"]),
])  # fmt: skip
def test_a_wait_text_without_tokens_is_refused_before_the_weights_load(tool, args, tiny_model_dir):
    # the tiny tokenizer drops whitespace-only text (Gemma's does not): the forcing was built after the load
    line = _one_line_error(run_tool(tool, f"--model_dir={tiny_model_dir}", "--wait_text=   ", "--min_think_tokens=2",
                                    "--max_new_tokens=8", *args), "wait_text")
    assert "encode to no tokens" in line


def test_sample_prompts_file_lines_end_at_newlines_only(tmp_path, tiny_model_dir):
    # a BOM is not prompt text, and U+2028 inside a line does not split it (str.splitlines made two prompts)
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffhello\nb\u2028c\r\n\n".encode())
    out = run_tool("sample", f"--model_dir={tiny_model_dir}", f"--prompts_file={path}", "--max_new_tokens=2")
    assert out.returncode == 0 and "(batch 2," in out.stdout, out.stderr[-2000:]
    assert "\ufeff" not in out.stdout


@pytest.mark.parametrize("content,expected", [(None, "(Is a directory)"), (b"\xff\xfehello\n", "is not UTF-8")])
def test_sample_prompts_file_that_cannot_be_read(content, expected, tmp_path):
    path = tmp_path
    if content is not None:
        path = tmp_path / "prompts.txt"
        path.write_bytes(content)
    assert expected in _one_line_error(run_tool("sample", f"--prompts_file={path}"), "prompts_file")


@pytest.mark.parametrize("args,flag", [
    (["--counts=2", "--num_max=5", "--target_min=1000", "--target_max=1001"], "target_max"),
    (["--counts=2", "--num_max=3", "--target_min=1", "--target_max=6", "--num_test=1000"], "num_test"),
    # a space too small to find out without drawing: the directory is refused before the draws
    (["--counts=2", "--num_max=9", "--target_min=1", "--target_max=18", "--num_test=500", "--out=/proc/x"], "out"),
    (["--out={tmp}/a_file"], "out"),
    (["--show=-2"], "show"),
])  # fmt: skip
def test_make_dataset_checks_ranges_then_the_directory_before_generating(args, flag, tmp_path):
    (tmp_path / "a_file").write_text("a file where a directory is expected\n")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    _one_line_error(run_tool("make_dataset", f"--out={out}", *args), flag)
    assert not out.exists()


def test_make_dataset_replaces_both_files_or_neither(tmp_path):
    """test.jsonl in the way (a directory): one line naming --out, and the previous train.jsonl untouched (a new
    train.jsonl was written beside the old test split, then a traceback)."""
    from data.tinyzero import save_splits

    (tmp_path / "train.jsonl").write_text("old\n")
    (tmp_path / "test.jsonl").mkdir()
    line = _one_line_error(run_tool("make_dataset", f"--out={tmp_path}", "--num_train=10", "--num_test=5"), "out")
    assert line.endswith("test.jsonl is a directory") and (tmp_path / "train.jsonl").read_text() == "old\n"
    (tmp_path / "test.jsonl").rmdir()
    train, test = make_splits(3, 2, 0)
    save_splits(tmp_path, {"train": train, "test": test})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporary file left
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("args,flag", [
    (["--preset=nope", "--dump_hlo={tmp}/dump"], "preset"),  # checked before the directory is made
    (["--preset=tiny-gemma2", "--dump_hlo={tmp}/a_file"], "dump_hlo"),
    (["--preset=tiny-gemma2", "--what=step", "--mesh=data=3", "--batch=4"], "batch"),
    # silently not applied before: the step runs every row whole without a tail or whole groups
    (["--preset=tiny-gemma3", "--what=step", "--batch=8", "--seq_len=64", "--mesh=fsdp=1", "--logprob_tail=16",
      "--shared_prompt", "--num_generations=3"], "shared_prompt"),
    (["--preset=tiny-gemma3", "--what=step", "--batch=8", "--seq_len=64", "--mesh=fsdp=1", "--shared_prompt",
      "--num_generations=4"], "shared_prompt"),
    # accepted before: a negative rollout, a budget outside --seq_len, a dump that wrote nothing, auto without devices
    (["--preset=tiny-gemma2", "--what=step", "--machine=gpu-80g", "--rollout_batch_size=-3"], "rollout_batch_size"),
    (["--preset=tiny-gemma2", "--what=step", "--machine=gpu-80g", "--max_new_tokens=-500"], "max_new_tokens"),
    (["--preset=tiny-gemma2", "--what=step", "--machine=gpu-80g", "--dump_hlo={tmp}/dump"], "machine"),
    (["--preset=tiny-gemma2", "--what=step", "--machine=auto"], "machine"),
])  # fmt: skip
def test_inspect_refuses_before_lowering(args, flag, tmp_path):
    (tmp_path / "a_file").write_text("a file where a directory is expected\n")
    _one_line_error(run_tool("inspect", *[a.format(tmp=tmp_path) for a in args]), flag)
    assert not (tmp_path / "dump").exists()


@pytest.mark.skipif(any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")),
                    reason="JAX can start a GPU here")
def test_inspect_gpu_without_one_is_a_flag_error():
    line = _one_line_error(run_tool("inspect", "--preset=tiny-gemma2", "--platform=gpu"), "platform")
    assert "cannot start it here" in line


@pytest.mark.parametrize("tool,bad", [("bench_train", "--tails=foo"), ("bench_sample", "--prompt_len=40000")])
def test_profile_dir_is_made_after_the_other_checks(tool, bad, tmp_path):
    _one_line_error(run_tool(tool, bad, f"--profile_dir={tmp_path / 'profile'}"), bad[2:].split("=")[0])
    assert not (tmp_path / "profile").exists()
