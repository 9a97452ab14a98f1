"""The learning mechanisms against the a + b + c collapse: dynamic sampling (grpo/dynamic_sampling.py), the
adaptive entropy bonus (grpo/entropy_control.py) and the level mix (grpo/level_mix.py).

References: scripted rewards and entropies whose right answer is known by hand (exact comparisons); the loop
test runs a tiny random model whose completions never earn a reward, so every group is silent and dynamic
sampling must run to its cap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from grpo.dynamic_sampling import max_rounds, pick_groups, sample_with_signal
from grpo.entropy_control import ENTROPY_BAND, EntropyControl, applied_coef, band_note, next_coef
from grpo.level_mix import FRONTIER_MIN_WEIGHT, LevelStats, draw_levels, level_shares, start_index
from grpo.rollout import SampledRows, zero_std_groups
from grpo.tasks import Scored

G = 4


def _rows(rewards: list[list[float]], tag: int = 0) -> SampledRows:
    """Scripted rows: one list of G rewards per group; solved = reward 1; items name (round, group)."""
    flat = [r for group in rewards for r in group]
    n = len(flat)
    items = [(tag, i // G) for i in range(n)]
    scored = [Scored(reward=r, solved=r == 1.0, format=True, text="") for r in flat]
    return SampledRows([[1, 2]] * n, items, np.zeros((n, 3), np.int32), np.full(n, 3), np.zeros(n, bool), scored,
                       0.0)


SILENT, SIGNAL = [0.1] * G, [0.1, 1.0, 0.1, 0.1]


def test_dynamic_sampling_fills_the_batch_with_signal_groups():
    """Round 0 has 1 of 3 groups with signal, round 1 has 2: the batch is those 3, in sampling order, and no third
    round is sampled."""
    script = {0: [SILENT, SIGNAL, SILENT], 1: [SIGNAL, SILENT, SIGNAL], 2: [SIGNAL] * 3}
    calls = []

    def one_round(r):
        calls.append(r)
        return _rows(script[r], tag=r)

    every, picked, used = sample_with_signal(one_round, 3, G, rounds=3)
    assert calls == [0, 1] and used == 2 and len(every.items) == 6 * G
    assert [picked.items[i] for i in range(0, 3 * G, G)] == [(0, 1), (1, 0), (1, 2)]
    assert not zero_std_groups(picked.rewards, G).any()


def test_dynamic_sampling_stops_at_its_cap_and_fills_with_silent_groups():
    calls = []

    def one_round(r):
        calls.append(r)
        return _rows([SILENT, SIGNAL] if r == 1 else [SILENT, SILENT], tag=r)

    every, picked, used = sample_with_signal(one_round, 2, G, rounds=max_rounds(2.5))
    assert calls == [0, 1] and used == 2  # floor(2.5) rounds, not 3
    assert [picked.items[i] for i in range(0, 2 * G, G)] == [(1, 1), (0, 0)]  # signal first, then the first silent
    assert zero_std_groups(picked.rewards, G).tolist() == [False, True]


def test_one_round_is_a_plain_step():
    rows = _rows([SILENT, SIGNAL])
    every, picked, used = sample_with_signal(lambda r: rows, 2, G, rounds=1)
    assert every is rows and picked is rows and used == 1
    np.testing.assert_array_equal(pick_groups(rows.rewards, G, 2), [1, 0])


def test_max_rounds():
    assert [max_rounds(x) for x in (1.0, 1.9, 2.0, 3.0, 3.5)] == [1, 1, 2, 3, 3]


def test_entropy_controller_moves_toward_its_target_and_is_inert_above_it():
    ctrl = EntropyControl(target=0.3, step=0.01, max_coef=0.025)
    coef = 0.0
    for _ in range(4):  # below target: the coefficient rises, clipped at max_coef
        coef = next_coef(ctrl, coef, 0.1)
    assert coef == pytest.approx(0.025)
    assert applied_coef(ctrl, coef, 0.1) == pytest.approx(0.025)
    assert applied_coef(ctrl, coef, 0.3) == 0.0 and applied_coef(ctrl, coef, 5.0) == 0.0  # inert at/above target
    assert applied_coef(ctrl, coef, None) == 0.0  # nothing measured yet
    coef = next_coef(ctrl, coef, 0.5)  # above target: it falls
    assert coef == pytest.approx(0.015)
    for _ in range(5):
        coef = next_coef(ctrl, coef, 9.7)
    assert coef == 0.0  # and never below 0
    assert next_coef(ctrl, 0.02, None) == 0.02  # a skipped step leaves it
    with pytest.raises(ValueError, match="target_entropy must be > 0"):
        EntropyControl(target=0.0)


def test_entropy_band_note():
    low, high = ENTROPY_BAND
    assert band_note((low + high) / 2) is None and band_note(None) is None
    assert "above the band" in band_note(high + 1) and "below the band" in band_note(low / 2)


def test_level_shares_follow_pass_rates():
    """Four levels, frontier 3: a level solved half the time outweighs one solved 95% of the time; the frontier at
    p = 0 keeps FRONTIER_MIN_WEIGHT; levels above the frontier get nothing."""
    s = level_shares([0.95, 0.5, 0.9, 0.0, 0.5], frontier=3, floor=0.0)
    w = np.array([0.95 * 0.05, 0.25, 0.09, FRONTIER_MIN_WEIGHT])
    np.testing.assert_allclose(s, np.append(w / w.sum(), 0.0))
    assert s[1] > s[2] > s[0] and s[4] == 0
    np.testing.assert_allclose(s.sum(), 1.0)


def test_the_frontiers_share_is_bounded_below_too():
    """Five earlier levels near p = 0.5 weigh 0.24 each: the frontier's weight alone (0.1) would be 7.6% of the
    mix; its share is raised to FRONTIER_MIN_WEIGHT and the earlier levels give up the rest in proportion."""
    p = [5 / 12] * 5 + [0.05]
    s = level_shares(p, frontier=5, floor=0.1)
    assert s[-1] == pytest.approx(FRONTIER_MIN_WEIGHT) and s.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(s[:-1], (1 - FRONTIER_MIN_WEIGHT) / 5)
    s = level_shares(p, frontier=5, floor=0.95)  # the floor wins where the two conflict
    assert s[-1] == pytest.approx(0.05)


def test_level_floor_and_start_and_mix_off():
    s = level_shares([1.0, 1.0, 0.5], frontier=2, floor=0.3)  # earlier levels weigh 0: lifted to the floor equally
    np.testing.assert_allclose(s, [0.15, 0.15, 0.7])
    s = level_shares([0.5, 0.5, 0.5], frontier=2, floor=0.3)  # already above the floor: unchanged
    np.testing.assert_allclose(s, [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(level_shares([0.5, 0.5, 0.5], frontier=1, floor=0.3, mix=False), [0, 1, 0])
    assert start_index(("a", "b"), "b") == 1 and start_index(("a", "b"), None) == 0
    with pytest.raises(ValueError, match="start_level: 'c' is not a level"):
        start_index(("a", "b"), "c")


def test_level_draws_are_seeded_and_follow_the_shares():
    shares = np.array([0.2, 0.8, 0.0])
    a, b = draw_levels(shares, 4000, 0, 7), draw_levels(shares, 4000, 0, 7)
    np.testing.assert_array_equal(a, b)  # (seed, step, round) fixes the draw: resumed runs draw the same levels
    assert not np.array_equal(a, draw_levels(shares, 4000, 0, 7, round_=1))
    assert abs((a == 1).mean() - 0.8) < 0.03 and not (a == 2).any()  # 3 sigma of a binomial(4000, 0.8) is 0.019
    np.testing.assert_array_equal(draw_levels(np.array([0.0, 1.0]), 5, 0, 0), [1] * 5)


def test_level_stats_decay():
    st = LevelStats().update(3, 4)
    assert st.rate == 0.75 and LevelStats().rate is None and st.update(0, 0) is st
    assert LevelStats().smoothed == 0.5 and LevelStats().update(0, 8).smoothed == 0.1  # 0/8 keeps some weight
    st = st.update(0, 4)  # 0.7 * 3 / (0.7 * 4 + 4)
    assert st.rate == pytest.approx(2.1 / 6.8)


@pytest.mark.parametrize("skip_silent", [False, True])
def test_loop_with_dynamic_sampling_runs_to_its_cap_on_a_silent_policy(tmp_path, skip_silent):
    """A tiny random model never writes an answer: every group is silent, so each step samples floor(3.0) rounds,
    logs oversample_ratio 3, frac_zero_std_groups / frac_zero_std_solved 1, and consumes 3 x P prompts; the
    adaptive entropy bonus is logged (0 before anything is measured, then rising: the tiny model's entropy is below
    a 50-nat target, measured on the silent groups' tokens when they stay in the loss; when they are left out the
    steps have no token and update nothing, and the coefficient rises all the same); --start_level makes level 1
    the frontier and the mix draws from it and the level below."""
    import jax
    from tiny_model import VOCAB, train_tokenizer

    import grpo
    import model
    from data.curriculum import LADDERS, level_splits
    from grpo.rollout import RolloutConfig
    from grpo.tasks import CountdownTask
    from grpo.trainer import TrainConfig, start_run, train_step
    from model.tokenizer import Tokenizer

    levels = LADDERS["countdown"]
    tok = Tokenizer(train_tokenizer(tmp_path / "tokenizer.model"))
    splits = [level_splits(lv, 20, 2, seed=0) for lv in levels]
    task = CountdownTask(train=[t for t, _ in splits], test=[h for _, h in splits], tokenizer=tok, levels=levels)
    cfg = model.tiny_config("gemma3", num_layers=1, vocab_size=VOCAB, embed_dim=32, hidden_dim=64)
    gcfg = grpo.GRPOConfig(num_generations=2, learning_rate=1e-3, entropy_control=EntropyControl(target=50.0))
    ctx, state = start_run(cfg, model.init_params(jax.random.key(0), cfg), task, gcfg,
                           RolloutConfig(max_new_tokens=6, dynamic_sampling=True, max_oversample=3.0,
                                         skip_zero_std_groups=skip_silent),
                           TrainConfig(output_dir=str(tmp_path / "run"), steps=2, prompts_per_step=2, eval_size=0,
                                       export_hf=False, start_level=levels[1].name),
                           grpo.make_mesh(data=1, fsdp=1), echo=lambda s: None)
    assert state.level == 1
    for _ in range(2):
        state = train_step(ctx, state)
    assert state.position == 2 * 3 * 2
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["oversample_ratio"] for r in m] == [3.0, 3.0]
    assert all(r["frac_zero_std_groups"] == 1.0 and r["frac_zero_std_solved"] == 1.0 for r in m)
    assert m[0]["entropy_coef_applied"] == 0.0  # nothing measured before the first step
    # silent groups kept: the first step's entropy (< 50 nats) is below the target, so the bonus applies next;
    # left out: no token, no update, no entropy measured, yet the coefficient rises (a step without signal)
    assert (m[1]["entropy_coef_applied"] > 0.0) == (not skip_silent)
    assert all((r["entropy"] is None) == skip_silent for r in m)
    assert state.entropy_coef == pytest.approx(2 * gcfg.entropy_control.step)
    assert set(m[0]["level_shares"]) == {levels[0].name, levels[1].name} and m[0]["level"] == levels[1].name
    assert sum(m[0]["answer_templates"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("recipe", ["laptop", "ladder", "tinyzero"])
def test_every_recipe_applies_to_bin_train(recipe, capsys):
    """Each recipe names only bin/train flags with values they accept: with it, a bad --steps is still the one
    error reported (a recipe key that is not a flag, or a value a flag rejects, would fail first). bin/train's
    main runs in this process (exit status and stderr as a user sees them)."""
    from binaries import ROOT, train_in_process

    tiny = ROOT / "tests" / "fixtures" / "gemma3_g2"
    result = train_in_process([f"--recipe={recipe}", f"--model_dir={tiny}", "--steps=-1", "--output_dir=/nonexistent"],
                              capsys)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --steps must be >= 0, got -1"], result.stderr[-2000:]
