"""The whole GRPO loop on a tiny random model: it learns a verifiable toy reward, and kill-and-resume is exact.

References: the toy reward's starting value (the random policy's rate, ~1/8) and its maximum (1.0); an
uninterrupted run's params for the resume test (tolerance 1e-6, in practice bitwise on CPU).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

import grpo
import model
from grpo.checkpoints import CheckpointMismatch
from grpo.rollout import RolloutConfig, align_grpo_config
from grpo.tasks import Scored, items_at
from grpo.trainer import TrainConfig, finish_run, logprob_phase, rollout_phase, start_run, train, update_phase
from model.sampling import SamplingConfig

TARGET_IDS = 32  # reward: the share of completion tokens with id < 32 (a random policy scores ~32/256)


@dataclasses.dataclass
class LowIdTask:
    """Prompt: 6 random ids. Reward: fraction of the completion's tokens below TARGET_IDS (dense, learnable)."""

    max_new: int
    eos_ids: tuple = (1,)

    def __post_init__(self):
        rng = np.random.default_rng(0)
        self.items = [tuple(int(t) for t in rng.integers(4, 256, 6)) for _ in range(64)]

    def train_items(self, position, count):
        return items_at(self.items, position, count, seed=0)

    def eval_items(self):
        return self.items[:8]

    def encode_prompt(self, item):
        return [2, *item]

    def score(self, item, completion):
        hits = int(np.sum(np.asarray(completion) < TARGET_IDS) - np.sum(np.isin(completion, self.eos_ids)))
        r = hits / self.max_new
        return Scored(reward=r, solved=r == 1.0, format=r > 0.5, text=" ".join(map(str, completion)))


def _setup(tmp_path, steps, lr=1e-2, **tkw):
    cfg = model.tiny_config("gemma2", num_layers=2, embed_dim=32, hidden_dim=64)
    params = model.init_params(jax.random.key(0), cfg)
    # The loop as these tests pin it: no entropy controller, every group in the loss.
    gcfg = grpo.GRPOConfig(num_generations=4, beta=0.0, learning_rate=lr, max_grad_norm=1.0, remat=False,
                           entropy_control=None)
    rollout = RolloutConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=1.0), skip_zero_std_groups=False)
    tkw = {"eval_size": 0, "export_hf": False, **tkw}
    tcfg = TrainConfig(output_dir=str(tmp_path), steps=steps, prompts_per_step=8, checkpoint_every=2, **tkw)
    return cfg, params, LowIdTask(max_new=8), gcfg, rollout, tcfg, grpo.make_mesh(data=1, fsdp=1)


def _rewards(out):
    return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_learns_toy_reward(tmp_path):
    """Sign and scale of the whole loop: reward rises from ~0.125 (random) to near 1 within 40 steps."""
    result = train(*_setup(tmp_path, steps=40), echo=lambda s: None)
    rewards = _rewards(tmp_path)
    assert np.mean(rewards[:3]) < 0.35
    assert np.mean(rewards[-5:]) > 0.8, rewards
    assert result["step"] == 40
    for key in ("step", "reward_mean", "solved_frac", "format_frac", "completion_len_mean", "kl", "sample_s",
                "train_s"):
        assert key in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    full = train(*_setup(tmp_path / "full", steps=4), echo=lambda s: None)["params"]
    train(*_setup(tmp_path / "cut", steps=2), echo=lambda s: None)  # "killed" after step 2 (checkpointed)
    resumed = train(*_setup(tmp_path / "cut", steps=4), echo=lambda s: None)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                 full, resumed)
    assert _rewards(tmp_path / "cut") == pytest.approx(_rewards(tmp_path / "full"))
    samples = [json.loads(line) for line in (tmp_path / "full" / "train_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 4 * 4  # 4 steps x 4 groups stored x G = 4 completions, a group's rows together
    assert [(s["step"], s["group"]) for s in samples[:5]] == [(1, 0)] * 4 + [(1, 1)]
    assert {"item", "completion", "reward", "solved", "format", "length", "truncated"} <= samples[0].keys()
    assert all(s["length"] == 8 for s in samples if s["truncated"])  # truncated: the whole budget, no stop
    said = []  # asked for fewer steps than the run has: said, and nothing trains
    again = train(*_setup(tmp_path / "cut", steps=3), echo=said.append)
    assert "nothing to train: the run is already at step 4 (steps: 3)" in said and again["final_state"] == "finished"
    assert len(_rewards(tmp_path / "cut")) == 4


def test_a_resume_restores_into_place_and_keeps_the_starting_weights_as_reference(tmp_path, monkeypatch):
    """A resume builds no fresh optimizer state beside the restored one (on an accelerator that was a second copy
    of the Adam moments at start-up), and its KL reference is still the starting weights (reference: the params
    the run started from, bitwise), while the trained params are the checkpoint's (they moved from the start)."""
    import grpo.trainer as trainer

    cfg, params, task, gcfg, rollout, tcfg, mesh = _setup(tmp_path, steps=2)
    gcfg = dataclasses.replace(gcfg, beta=0.04)
    start = jax.tree.map(np.asarray, params)
    train(cfg, params, task, gcfg, rollout, tcfg, mesh, echo=lambda s: None)

    def no_fresh_state(*args):
        raise AssertionError("a resume built a fresh optimizer state")

    monkeypatch.setattr(trainer, "init_trained_state", no_fresh_state)
    again = dataclasses.replace(tcfg, steps=3)
    ctx, state = start_run(cfg, _setup(tmp_path, steps=3)[1], task, gcfg, rollout, again, mesh, echo=lambda s: None)
    assert state.step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ctx.reference, start)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, start)
    assert max(jax.tree.leaves(moved)) > 0
    finish_run(ctx, state)
    # without a KL reference the fresh weights are consumed at once, as a fresh start's first step donates them
    fresh = _setup(tmp_path, steps=3)[1]
    ctx, state = start_run(cfg, fresh, task, dataclasses.replace(gcfg, beta=0.0), rollout, again, mesh,
                           echo=lambda s: None)
    assert ctx.reference is None and all(x.is_deleted() for x in jax.tree.leaves(fresh))
    finish_run(ctx, state)


def test_rollout_settings_drive_the_grpo_config():
    """The rollout is the one place temperature and budget are set: a direct train() call cannot mismatch them."""
    hand_set = grpo.GRPOConfig(temperature=0.5, logprob_tail=3, max_completion_length=7)
    aligned = align_grpo_config(hand_set, RolloutConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=0.7)))
    assert (aligned.temperature, aligned.logprob_tail, aligned.max_completion_length) == (0.7, 16, 16)
    greedy = align_grpo_config(hand_set, RolloutConfig(max_new_tokens=4, sampling=SamplingConfig(temperature=0.0)))
    assert greedy.temperature == 1.0  # greedy rollouts are scored under the plain softmax


def test_phases_compose_to_one_train_step(tmp_path):
    """Calling the phases by hand gives exactly the params of train(steps=1) (reference: that run, bitwise)."""
    args = _setup(tmp_path / "phases", steps=1)
    ctx, state = start_run(*args, echo=lambda s: None)
    assert ctx.grpo_cfg.logprob_tail == ctx.rollout_cfg.max_new_tokens == 8
    rollout = rollout_phase(ctx, state)
    assert rollout.batch["tokens"].shape[0] == 8 * 4 and len(rollout.scored) == 32
    batch = logprob_phase(ctx, state.params, rollout.batch)
    assert "ref_logprobs" not in batch and "old_logprobs" not in batch  # beta 0, one iteration: no extra pass
    params, _, metrics = update_phase(ctx, state.params, state.opt_state, batch)
    assert metrics["skipped"] == 0.0
    finish_run(ctx, state)
    whole = train(*_setup(tmp_path / "whole", steps=1), echo=lambda s: None)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, whole)


def test_reference_and_old_policy_passes(tmp_path):
    """beta > 0 scores the batch under the frozen reference (the starting params), num_iterations > 1 under the
    policy that sampled it. Reference: the log-prob function on those params directly, exactly; the policy after
    one update differs from the reference (so reading the current params for ref_logprobs would fail)."""
    cfg, params, task, gcfg, rollout, tcfg, mesh = _setup(tmp_path, steps=2)
    gcfg = dataclasses.replace(gcfg, beta=0.04, num_iterations=2)
    ctx, state = start_run(cfg, params, task, gcfg, rollout, tcfg, mesh, echo=lambda s: None)
    batch = logprob_phase(ctx, state.params, rollout_phase(ctx, state).batch)
    rows = (batch["tokens"], batch["attention_mask"])
    start = np.asarray(ctx.logprobs_fn(ctx.frozen, state.params, *rows))
    np.testing.assert_array_equal(np.asarray(batch["ref_logprobs"]), start)
    np.testing.assert_array_equal(np.asarray(batch["old_logprobs"]), start)
    moved, _, metrics = update_phase(ctx, state.params, state.opt_state, batch)
    assert metrics["kl"] > 0  # the second iteration's policy has left the reference
    again = logprob_phase(ctx, moved, {k: np.asarray(v) for k, v in batch.items() if k.endswith("mask")
                                       or k in ("tokens", "advantages", "truncated")})
    now = np.asarray(ctx.logprobs_fn(ctx.frozen, moved, *rows))
    mask = np.asarray(batch["completion_mask"])[:, -now.shape[1]:] > 0
    np.testing.assert_array_equal(np.asarray(again["ref_logprobs"]), start)  # still the starting params
    np.testing.assert_array_equal(np.asarray(again["old_logprobs"]), now)
    assert np.abs(now - start)[mask].max() > 1e-4
    finish_run(ctx, state)


def test_log_to_tensorboard_mirrors_metrics(tmp_path):
    """--log_to tensorboard: the loop's step numbers land in event files (reference: metrics.jsonl's values)."""
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra (CI installs it)")
    from tensorboardX.proto.event_pb2 import Event
    from test_loggers import tfrecords

    train(*_setup(tmp_path, steps=1, log_to=("tensorboard",)), echo=lambda s: None)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    logged = [v.simple_value for r in tfrecords(events) for v in Event.FromString(r).summary.value
              if v.tag == "reward_mean"]
    reward = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["reward_mean"]
    assert logged == pytest.approx([reward])
    assert json.loads((tmp_path / "run_config.json").read_text())["rollout"]["max_new_tokens"] == 8


def test_lora_run_trains_only_adapters_and_resumes_exactly(tmp_path):
    """LoRA on the toy task: the adapters train (every b leaves 0), the base params never change (bitwise),
    resume after a stop equals an uninterrupted run (1e-6), and a LoRA run refuses a full-fine-tuning
    checkpoint dir."""
    lora = model.LoraConfig(rank=4)
    cfg, params, task, gcfg, rollout, tcfg, mesh = _setup(tmp_path / "full", steps=4)
    base = jax.tree.map(np.asarray, params)
    full = train(cfg, params, task, gcfg, rollout, tcfg, mesh, echo=lambda s: None, lora_cfg=lora)
    assert set(full["params"]) == {"layers"} and set(full["params"]["layers"]) == set(lora.targets)
    jax.tree.map(np.testing.assert_array_equal, base, jax.tree.map(np.asarray, params))  # not donated
    assert all(np.abs(np.asarray(t["b"])).max() > 0 for t in full["params"]["layers"].values())  # b left 0
    train(*_setup(tmp_path / "cut", steps=2), echo=lambda s: None, lora_cfg=lora)
    resumed = train(*_setup(tmp_path / "cut", steps=4), echo=lambda s: None, lora_cfg=lora)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                 full["params"], resumed["params"])
    train(*_setup(tmp_path / "plain", steps=2), echo=lambda s: None)  # a full-fine-tuning run's checkpoints
    with pytest.raises(CheckpointMismatch, match="does not match this run"):
        train(*_setup(tmp_path / "plain", steps=4), echo=lambda s: None, lora_cfg=lora)


@pytest.mark.parametrize("error, state", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_an_error_or_ctrl_c_in_the_first_eval_is_recorded(tmp_path, monkeypatch, error, state):
    """A second Ctrl-C or an error during the step-0 eval (before the steps' own handling): status.json says
    so, where it said "running" and the next start blamed the OOM killer."""
    import grpo.trainer as trainer

    def fail(ctx, state):
        raise error("in the eval")

    monkeypatch.setattr(trainer, "eval_phase", fail)
    with pytest.raises(error):
        train(*_setup(tmp_path, steps=2, eval_size=2), echo=lambda s: None)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == state and status["step"] == 0
    assert ("reason" in status) == (state == "failed")
