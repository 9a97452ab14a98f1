"""The difficulty ladder: level data, shaped rewards and shaping modes, promotion, zero-signal groups, recipes.

References: TinyZero's reward (data.countdown.score) for the top level and every level the shaping leaves plain,
hand-worked rewards for the shaped levels, LADDERS itself for the legacy shaping, and the promotion rule stated
in grpo/trainer.py (exact comparisons, no tolerances).
"""

from __future__ import annotations

import collections
import dataclasses
import types

import numpy as np
import pytest
from absl import flags

from data import countdown, curriculum
from data.curriculum import LADDERS, TINYZERO, LevelReward, level_splits
from data.puzzles import Puzzle
from grpo.ladder_steps import promote
from grpo.rollout import zero_std_groups
from grpo.trainer import LoopState, TrainConfig

LEVELS = LADDERS["countdown"]


def test_ladder_climbs_to_tinyzero_with_tinyzero_reward():
    assert [lv.name for lv in LEVELS][-1] == TINYZERO and LEVELS[-1].reward == LevelReward()
    assert LEVELS[0].puzzles.counts == (2,) and LEVELS[0].puzzles.num_max <= 9
    assert curriculum.ladder("off") == curriculum.ladder(None) == curriculum.OFF
    with pytest.raises(ValueError, match="unknown curriculum 'steep'"):
        curriculum.ladder("steep")


def test_the_rungs_in_order():
    """3x1-99 and 4x1-30 sit between 3x1-30 and TinyZero's puzzles, each changing one thing (range, count)."""
    assert [lv.name for lv in LEVELS] == ["2x1-9", "2x1-30", "3x1-30", "3x1-99", "4x1-30", TINYZERO]
    by_name = {lv.name: lv for lv in LEVELS}
    for name, counts, num_max in (("3x1-99", (3,), 99), ("4x1-30", (4,), 30)):
        lv = by_name[name]
        assert (lv.puzzles.counts, lv.puzzles.num_min, lv.puzzles.num_max) == (counts, 1, num_max)
        assert (lv.puzzles.target_min, lv.puzzles.target_max) == (10, 100)
        assert lv.reward == LevelReward(partial_score=0.15, numbers_score=0.25)
    assert by_name["3x1-99"].examples == by_name["3x1-30"].examples == curriculum.THREE_NUMBERS
    assert by_name["4x1-30"].examples == ()


def test_the_balanced_ladder():
    """Its 2-number levels are drawn operation first (tests/test_puzzles.py), 2x1-30-ops over the countdown
    ladder's ranges; the levels above are the same objects, so the same held-out puzzles and the two ladders' evals
    compare there."""
    balanced = LADDERS["balanced"]
    assert [lv.name for lv in balanced[:2]] == ["2x1-20-ops", "2x1-30-ops"] and balanced[2:] == LEVELS[2:]
    assert balanced[1].puzzles == dataclasses.replace(LEVELS[1].puzzles, balance_ops=True)
    first = balanced[0].puzzles
    assert (first.counts, first.num_max, first.target_max, first.balance_ops) == ((2,), 20, 40, True)
    for ops, plain in zip(balanced[:2], LEVELS[:2], strict=True):
        assert (ops.reward, ops.examples) == (plain.reward, plain.examples)


def test_the_balanced_ladders_splits_stay_balanced():
    """With the ladder recipe's 64 held-out puzzles per level: each 2-number level holds out 16 of each operation,
    and its training stream (every level's held-out puzzles excluded) still draws each a quarter of the time, so
    the sum solves about a quarter. Tolerance 0.03: three binomial standard deviations at n = 2000 (0.0097). Drawing
    the held-out set as the stream's first 64 distinct puzzles left 2x1-9-ops no product to train on."""
    from data.puzzles import OPS, operation
    from data.task_data import level_puzzles

    levels, trains, tests = level_puzzles("balanced", "first_rung", None, 2000, 64, 0)
    heldout = {p.key for test in tests for p in test}
    for level, train, test in zip(levels[:2], trains, tests, strict=False):
        assert sorted(collections.Counter(map(operation, test)).values()) == [16] * 4, level.name
        assert len({p.key for p in test}) == 64 and not heldout & {p.key for p in train}
        shares = collections.Counter(map(operation, train))
        assert all(abs(shares[op] / len(train) - 0.25) < 0.03 for op in OPS), (level.name, shares)
        assert abs(np.mean([sum(p.nums) == p.target for p in train]) - 0.25) < 0.03
    with pytest.raises(ValueError, match="--eval_size .*num_test 100: .* \\* alone makes 41: at most 80"):
        level_puzzles("balanced", "first_rung", None, 50, 100, 0)


def test_shaping_modes():
    """first_rung (the default): the first level keeps its rungs, every later one pays TinyZero's reward; legacy:
    LADDERS as written; off: TinyZero's reward everywhere. Puzzles and worked examples never change."""
    assert curriculum.SHAPINGS == ("first_rung", "legacy", "off")
    first, legacy, off = (curriculum.ladder("countdown", s) for s in curriculum.SHAPINGS)
    assert curriculum.ladder("countdown") == first
    assert legacy == LEVELS
    assert first[0] == LEVELS[0] and first[0].reward.numbers_score == 0.4
    assert all(lv.reward == LevelReward() for lv in first[1:]) and all(lv.reward == LevelReward() for lv in off)
    for shaped in (first, off):
        assert [(lv.name, lv.puzzles, lv.examples) for lv in shaped] == [
            (lv.name, lv.puzzles, lv.examples) for lv in LEVELS]
    for shaping in curriculum.SHAPINGS:
        assert curriculum.ladder("off", shaping) == curriculum.ladder(None, shaping) == curriculum.OFF
    with pytest.raises(ValueError, match="unknown shaping 'gentle'; choose from first_rung, legacy, off"):
        curriculum.ladder("countdown", "gentle")
    with pytest.raises(ValueError, match="unknown shaping"):
        curriculum.ladder("off", "gentle")


@pytest.mark.parametrize("text", ["<answer>5 - 3</answer>", "<answer>3 + 5</answer>", "<answer>5</answer>",
                                  "<answer>3, 5</answer>", "<answer> </answer>", "<answer>7</answer>", "x"])
def test_plain_levels_pay_tinyzeros_reward(text):
    for lv in curriculum.ladder("countdown")[1:]:
        reward, solved, has_answer = lv.reward.score(text, (3, 5), 8)
        b = countdown.breakdown(text, (3, 5), 8)
        assert (reward, solved, has_answer) == (countdown.score(text, (3, 5), 8), b.solved, b.has_answer)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.name)
def test_heldout_is_fixed_across_runs_and_never_trained_on(level):
    train0, heldout0 = level_splits(level, 300, 16, seed=0)
    train1, heldout1 = level_splits(level, 300, 16, seed=1)
    assert heldout0 == heldout1  # the level's own seed: runs compare line by line
    assert train0 != train1 and len(train0) == len(train1) == 300
    assert not {p.key for p in heldout0} & {p.key for p in train0 + train1}
    cfg = level.puzzles
    for p in heldout0 + train0:
        assert len(p.nums) in cfg.counts and cfg.num_min <= min(p.nums) <= max(p.nums) <= cfg.num_max
        assert cfg.target_min <= p.target <= cfg.target_max
        assert countdown.score(f"<answer>{p.solution}</answer>", p.nums, p.target) == 1.0


def test_no_level_trains_on_any_levels_heldout():
    """The levels' puzzle spaces nest (2x1-30 holds every 2x1-9 puzzle): before, 2x1-30's train list held 62 of
    2x1-9's 64 held-out puzzles, so a promoted run's easy-level eval measured recall."""
    from data.task_data import level_puzzles

    levels, trains, tests = level_puzzles("countdown", "first_rung", None, 3000, 64, 0)
    heldout = {p.key for test in tests for p in test}
    assert [len(t) for t in tests] == [64] * len(levels) and all(len(t) == 3000 for t in trains)
    for level, train in zip(levels, trains, strict=True):
        assert not heldout & {p.key for p in train}, level.name
    # without the exclusion the nesting shows up: the next level's stream draws the easy level's held-out puzzles
    plain = curriculum.train_split(levels[1], 3000, 0, set())
    assert {p.key for p in tests[0]} & {p.key for p in plain}


def test_curriculum_off_evaluates_on_the_ladders_tinyzero_puzzles():
    """--curriculum off draws its held-out set from the level's seed too: off and ladder runs compare."""
    from data.task_data import level_puzzles

    _, _, off0 = level_puzzles("off", "first_rung", None, 50, 16, 0)
    _, _, off1 = level_puzzles("off", "first_rung", None, 50, 16, 1)
    _, _, ladder = level_puzzles("countdown", "first_rung", None, 50, 16, 0)
    assert off0 == off1 == [ladder[-1]]


def test_make_datasets_output_is_a_data_file(tmp_path):
    """bin/make_dataset's --out (or its train.jsonl) as --data_file: the top level trains on its train split and
    evaluates on its test split, whole (it was read as TinyZero's 328,704-row file and refused)."""
    from data.puzzles import make_splits
    from data.task_data import level_puzzles
    from data.tinyzero import save_splits

    train, test = make_splits(40, 12, seed=3)
    save_splits(tmp_path, {"train": train, "test": test})
    for data_file in (tmp_path, tmp_path / "train.jsonl"):
        _, trains, tests = level_puzzles("off", "first_rung", str(data_file), 50, 8, 0)
        assert trains == [train] and tests == [test[:8]]
    # a training row that is another level's held-out puzzle leaves the top level's training list
    _, _, ladder_tests = level_puzzles("countdown", "first_rung", None, 50, 8, 0)
    save_splits(tmp_path, {"train": [ladder_tests[2][0], *train], "test": test})
    _, trains, _ = level_puzzles("countdown", "first_rung", str(tmp_path), 50, 8, 0)
    assert trains[-1] == train
    with pytest.raises(ValueError, match="--eval_size 13: .* has only 12 held-out"):  # not 12 silently
        level_puzzles("off", "first_rung", str(tmp_path), 50, 13, 0)
    save_splits(tmp_path, {"train": test[:8], "test": test})  # all held out: refused before any step, not a crash
    with pytest.raises(ValueError, match="--data_file: every training row of .* is a held-out puzzle"):
        level_puzzles("off", "first_rung", str(tmp_path), 50, 8, 0)
    (tmp_path / "test.jsonl").unlink()  # a lone train.jsonl is read as TinyZero's file, whose row ranges it lacks
    with pytest.raises(ValueError, match="--data_file: .*or bin/make_dataset's --out directory"):
        level_puzzles("off", "first_rung", str(tmp_path / "train.jsonl"), 50, 8, 0)


def test_a_level_whose_space_is_all_held_out_is_an_error_not_a_hang():
    easy = LEVELS[0]  # 115 distinct puzzles
    with pytest.raises(ValueError, match="every one of its puzzles is held out; lower --eval_size"):
        level_splits(easy, 10, 115, seed=0)
    assert len(level_splits(easy, 10, 114, seed=0)[0]) == 10  # one left: drawn again and again


def test_no_prompt_shows_its_own_solution():
    for lv in LEVELS:
        for ex in lv.examples:
            for nums in (ex.nums, ex.nums[::-1]):
                shown = lv.example_for(Puzzle(nums, ex.target))
                assert (tuple(sorted(shown.nums)), shown.target) != (tuple(sorted(ex.nums)), ex.target)


@pytest.mark.parametrize("completion,want", [
    ("</think>\n<answer>3 + 5</answer>", (1.0, True, True)),  # solved
    ("</think>\n<answer>5 - 3</answer>", (0.4, False, True)),  # the given numbers, wrong value: the middle rung
    ("</think>\n<answer>3 + 4</answer>", (0.1, False, True)),  # a number not given: format only
    ("<answer>3 * 3</answer>", (0.1, False, True)),  # 3 twice: not a sub-multiset of [3, 5]
    ("<answer>5 </answer>", (0.2, False, True)),  # some of the given numbers: the partial rung
    ("<answer> </answer>", (0.1, False, True)),  # empty: format only
    ("<answer>(1 + 2) / 3</answer>", (0.1, False, True)),  # the prompt's example copied
    ("<answer>3, 5</answer>", (0.1, False, True)),  # the numbers, but not an expression (run 3's hack)
    ("<answer>5 \u2013 3</answer>", (0.1, False, True)),  # an en dash is not a minus sign
    ("<answer>5 -</answer>", (0.1, False, True)),  # malformed: no middle rung
    ("no answer", (0.0, False, False)),
])
def test_shaped_reward_of_the_easiest_level(completion, want):
    assert LEVELS[0].reward.score(completion, (3, 5), 8) == want


def test_top_level_reward_is_tinyzeros():
    for text in ("<answer>5 - 3</answer>", "<answer>3 + 5</answer>", "<answer>7</answer>", "x"):
        reward, _, _ = LEVELS[-1].reward.score(text, (3, 5), 8)
        assert reward == countdown.score(text, (3, 5), 8)


def _ctx(window=3, promote_at=0.5):
    said = []
    task = types.SimpleNamespace(level_names=("a", "b", "c"))
    ctx = types.SimpleNamespace(train_cfg=TrainConfig(output_dir="x", promote_at=promote_at, promote_window=window),
                                task=task, log=types.SimpleNamespace(say=said.append))
    return ctx, said


def test_promotion_needs_a_full_window_at_the_bar_and_stops_at_the_top():
    ctx, said = _ctx()
    state = LoopState(params={}, opt_state=None)
    for solved in (0.9, 0.9):  # a window of 3 is not full yet
        state = promote(ctx, state, solved)
    assert state.level == 0 and state.recent_solved == (0.9, 0.9)
    state = promote(ctx, state, 0.0)  # mean 0.6 >= 0.5
    assert state.level == 1 and state.recent_solved == () and "promoted to level b" in said[0]
    for solved in (0.5, 0.4, 0.5):  # mean 0.467 < 0.5: stays, the window slides
        state = promote(ctx, state, solved)
    assert state.level == 1 and state.recent_solved == (0.5, 0.4, 0.5)
    state = promote(ctx, state, 0.7)  # window (0.4, 0.5, 0.7): mean 0.533
    assert state.level == 2
    for _ in range(6):
        state = promote(ctx, state, 1.0)
    assert state.level == 2  # the top level is the last


def test_zero_std_groups():
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.1, 0.1, 0.0, 0.0])
    np.testing.assert_array_equal(zero_std_groups(rewards, 2), [True, False, True, True])
    np.testing.assert_array_equal(zero_std_groups(rewards, 4), [False, False])


def test_recipe_sets_only_what_the_command_line_left_alone():
    from grpo import presets

    fv = flags.FlagValues()
    flags.DEFINE_integer("num_generations", 4, "", flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-5, "", flag_values=fv)
    fv(["prog", "--learning_rate=3e-6"])
    presets.apply(fv, {"num_generations": 8, "learning_rate": 2e-5})
    assert (fv.num_generations, fv.learning_rate) == (8, 3e-6)
    assert presets.recipe("laptop") is presets.RECIPES["laptop"]
    with pytest.raises(ValueError, match="^--recipe: unknown recipe 'fast'"):
        presets.recipe("fast")


def test_loop_on_the_ladder_logs_levels(tmp_path):
    """End to end on a tiny random model with a real SentencePiece tokenizer (and the '</answer>' stop table built
    from it): each metrics line names the level, each eval line holds solved_by_level (easiest first, TinyZero
    last), and the samples carry their level and puzzle."""
    import json

    import jax
    from tiny_model import VOCAB, train_tokenizer

    import grpo
    import model
    from grpo.rollout import RolloutConfig
    from grpo.tasks import CountdownTask
    from grpo.trainer import train
    from model.tokenizer import Tokenizer

    tok = Tokenizer(train_tokenizer(tmp_path / "tokenizer.model"))
    splits = [level_splits(lv, 20, 2, seed=0) for lv in LEVELS]
    task = CountdownTask(train=[t for t, _ in splits], test=[h for _, h in splits], tokenizer=tok, levels=LEVELS)
    cfg = model.tiny_config("gemma3", num_layers=2, vocab_size=VOCAB, embed_dim=32, hidden_dim=64)
    train(cfg, model.init_params(jax.random.key(0), cfg), task,
          grpo.GRPOConfig(num_generations=2, learning_rate=1e-3), RolloutConfig(max_new_tokens=12),
          TrainConfig(output_dir=str(tmp_path / "run"), steps=2, prompts_per_step=2, eval_size=2,
                      checkpoint_every=2, export_hf=False),
          grpo.make_mesh(data=1, fsdp=1), echo=lambda s: None)
    run = tmp_path / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["level"] for m in metrics] == ["2x1-9", "2x1-9"] and "frac_zero_std_groups" in metrics[0]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert list(evals[0]["solved_by_level"]) == [lv.name for lv in LEVELS]
    # the base model's self-verification baseline (step 0) and the same numbers later, per level, recomputed
    # from the held-out completions the eval wrote (eval_samples.jsonl keeps the first few of each set)
    from grpo.evaluation import aha_split

    assert all(list(e["aha_by_level"]) == [lv.name for lv in LEVELS] for e in evals)
    kept = [json.loads(x) for x in (run / "eval_samples.jsonl").read_text().splitlines()]
    for e in evals:
        for name, got in e["aha_by_level"].items():
            rows = [r for r in kept if r["step"] == e["step"] and r["level"] == name]
            assert len(rows) == 2 and got == aha_split(rows)  # eval_size 2: every completion was kept
    samples = [json.loads(x) for x in (run / "train_samples.jsonl").read_text().splitlines()]
    assert {s["level"] for s in samples} == {"2x1-9"} and all(s["nums"] and s["target"] for s in samples)


@pytest.mark.parametrize("template", ["base", "chat"])
def test_worked_examples_on_easy_levels_only(template):
    """Easy levels show one solved puzzle first, picked per puzzle from one example per operation (each answer
    really solves its puzzle, by TinyZero's reward); the pick is fixed per puzzle and covers every example;
    TinyZero's level keeps TinyZero's prompt verbatim."""
    from data import prompts
    from grpo.tasks import CountdownTask, LevelPuzzle

    for i, lv in enumerate(LEVELS):
        pool = level_splits(lv, 200, 0, seed=0)[0]
        if lv.name in (TINYZERO, "4x1-30"):  # the levels next to TinyZero's: TinyZero's prompt, no example
            assert lv.examples == () and lv.example_for(pool[0]) is None
            p = pool[0]
            assert CountdownTask.prompt_text(types.SimpleNamespace(levels=LEVELS, template=template),
                                             LevelPuzzle(p, i)) == prompts.render(template, p.nums, p.target)
            continue
        for ex in lv.examples:
            assert len(ex.nums) == lv.puzzles.counts[0]
            assert countdown.score(f"<think>{ex.work}</think>\n<answer> {ex.answer} </answer>", list(ex.nums),
                                   ex.target) == 1.0
        assert {lv.example_for(p) for p in pool} == set(lv.examples)  # every example is used
        puzzle = Puzzle((5, 6) if lv.puzzles.counts[0] == 2 else (5, 6, 7), 11)
        ex = lv.example_for(puzzle)
        assert ex is lv.example_for(Puzzle(puzzle.nums, puzzle.target))  # fixed per puzzle
        text = prompts.render(template, puzzle.nums, puzzle.target, ex)
        plain = prompts.render(template, puzzle.nums, puzzle.target)
        assert text != plain and text.endswith(plain.rsplit("User: ", 1)[-1] if template == "base" else plain)
        assert f"Using the numbers {list(ex.nums)}, create an equation that equals {ex.target}" in text
        assert text.count("Let me solve this step by step.\n<think>") == 2
        task = types.SimpleNamespace(levels=LEVELS, template=template)
        assert CountdownTask.prompt_text(task, LevelPuzzle(puzzle, i)) == text


def test_chunked_rollout_equals_one_call_when_greedy(tmp_path):
    """--rollout_batch_size splits the sampler call; greedy rows do not depend on which call drew them."""
    import jax
    from tiny_model import VOCAB, train_tokenizer

    import model
    from grpo.rollout import RolloutConfig, sample_groups
    from grpo.tasks import CountdownTask
    from model.sampling import SamplingConfig
    from model.tokenizer import Tokenizer

    tok = Tokenizer(train_tokenizer(tmp_path / "tokenizer.model"))
    splits = [level_splits(lv, 20, 2, seed=0) for lv in LEVELS]
    task = CountdownTask(train=[t for t, _ in splits], test=[h for _, h in splits], tokenizer=tok, levels=LEVELS)
    cfg = model.tiny_config("gemma3", num_layers=2, vocab_size=VOCAB, embed_dim=32, hidden_dim=64)
    params = model.init_params(jax.random.key(0), cfg)
    items = task.train_items(0, 3, level=0)
    greedy = SamplingConfig(temperature=0.0)
    runs = [sample_groups(params, cfg, task, items, 2, RolloutConfig(max_new_tokens=10, sampling=greedy,
                                                                     batch_rows=rows), jax.random.key(1), "group")
            for rows in (0, 4, 1)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.batch["tokens"], runs[0].batch["tokens"])
        np.testing.assert_array_equal(other.lengths, runs[0].lengths)
    assert runs[0].batch["tokens"].shape[0] == 6
