"""Keep the best, stop the bad: the guard's conditions on scripted metrics, best/ on a real (tiny) loop, and a run
that learns, is then degraded, and stops by itself.

References: scripted eval and step values whose verdict is known by hand (the step each condition fires at);
for the loop tests, the run's own eval.jsonl (best/ must hold exactly the best-scoring eval's state, status.json
must name it) and the toy reward's maximum (a policy that has learned scores near 1).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import pytest
from test_train_loop import LowIdTask, _setup

import model
from grpo.best_model import BEST_DIR, better, eval_score
from grpo.guard import GuardConfig, GuardState, Watch, after_rollback, observe
from grpo.trainer import train

CFG = GuardConfig(warmup_steps=4, patience=2, format_drop=0.3, score_drop=0.15)


def _run(cfg: GuardConfig, seq: list[tuple[int, dict]]) -> list[tuple[int, str]]:
    """Feed (step, values) in order; the (step, metric) of every alarm."""
    state, fired = GuardState(), []
    for step, values in seq:
        state, alarm = observe(cfg, state, step, values)
        if alarm:
            fired.append((step, alarm.metric))
    return fired


def test_format_arms_late_and_fires_after_patience_evals():
    """No format at first (a base model): never armed, no alarm; it rises to 0.9, then falls to 0.2 at steps 14
    and 16: the second bad eval fires, naming the stretch's first step."""
    seq = [(0, {"format": 0.0}), (2, {"format": 0.0}), (6, {"format": 0.5}), (10, {"format": 0.9}),
           (12, {"format": 0.7}), (14, {"format": 0.2}), (16, {"format": 0.2}), (18, {"format": 0.1})]
    assert _run(CFG, seq) == [(16, "format"), (18, "format")]
    state = GuardState()
    for step, values in seq[:7]:
        state, alarm = observe(CFG, state, step, values)
    assert alarm.since == 14 and "eval format 0.200" in alarm.detail and "best 0.9" in alarm.detail


def test_noise_within_limits_and_a_run_that_starts_low_do_not_fire():
    noisy = [(s, {"format": f, "score": v}) for s, f, v in
             zip(range(0, 40, 4), [0.9, 0.75, 0.85, 0.65, 0.9, 0.7, 0.8, 0.62, 0.9, 0.7],
                 [0.3, 0.2, 0.25, 0.16, 0.3, 0.2, 0.28, 0.2, 0.3, 0.16], strict=True)]
    assert _run(CFG, noisy) == []
    low = [(s, {"format": 0.2 if s < 20 else 0.0, "score": 0.1 if s < 20 else 0.0}) for s in range(0, 40, 4)]
    assert _run(CFG, low) == []  # its best never reached the drop: nothing to lose, never armed
    # a drop of exactly the limit is inside it (0.9 - 0.3 is 0.6000000000000001 in floats; 0.45 - 0.15 likewise)
    edge = [(s, {"format": 0.9 if s < 8 else 0.6, "score": 0.45 if s < 8 else 0.3}) for s in range(0, 40, 4)]
    assert _run(CFG, edge) == []


def test_entropy_arms_inside_the_band_after_warmup():
    """Entropy 3.0 from the start (above the band): never armed. Inside the band at step 2 (warmup) does not arm
    either; inside at step 5 does, and two steps above the band then fire."""
    assert _run(CFG, [(s, {"entropy": 3.0}) for s in range(1, 10)]) == []
    seq = [(1, {"entropy": 1.0}), (2, {"entropy": 3.0}), (3, {"entropy": 3.0}), (5, {"entropy": 1.0}),
           (6, {"entropy": 2.5}), (7, {"entropy": 1.9}), (8, {"entropy": 2.5}), (9, {"entropy": 4.0})]
    assert _run(CFG, seq) == [(9, "entropy")]
    assert _run(CFG, [(s, {"entropy": 0.001}) for s in range(1, 12)]) == []  # collapse is the report's, not a stop


def test_nonfinite_is_always_armed_and_survives_noguard():
    seq = [(1, {"nonfinite": 1.0}), (2, {"nonfinite": 2.0}), (3, {"nonfinite": 3.0})]
    assert _run(CFG, seq) == [(3, "nonfinite")]
    # --max_bad_steps 1 with a run non-finite from step 1: it never armed (arming needed a value inside the limits)
    one = dataclasses.replace(CFG, max_bad_steps=1)
    assert _run(one, [(s, {"nonfinite": float(s)}) for s in range(1, 4)])[0] == (1, "nonfinite")
    _, alarm = observe(CFG, GuardState(), 7, {"nonfinite": 3.0})
    assert alarm.since == 5  # three skipped steps in a row at step 7: the stretch began at step 5
    off = dataclasses.replace(CFG, enabled=False)
    assert _run(off, seq) == [(3, "nonfinite")]
    assert _run(off, [(s, {"entropy": 1.0 if s < 6 else 5.0}) for s in range(1, 12)]) == []


def test_rollback_restarts_the_count_and_state_round_trips():
    state = GuardState()
    for step, f in ((6, 0.9), (8, 0.1), (10, 0.1)):
        state, alarm = observe(CFG, state, step, {"format": f})
    assert alarm.metric == "format"
    state = after_rollback(state, "format")
    # the eval watches start over: best/ may hold a model below the run's best on the guard's means (best/ ranks
    # the top level first), and a kept best fired again at its first evals, spending every rollback on it
    assert state.rollbacks == 1 and state.watches["format"] == Watch()
    assert GuardState.from_json(json.loads(json.dumps(state.to_json()))) == state
    for step, f in ((12, 0.5), (14, 0.5), (16, 0.5), (18, 0.5)):  # the restored model's level: no alarm
        state, alarm = observe(CFG, state, step, {"format": f})
        assert alarm is None
    for step in (20, 22, 24):  # a drop from the restored model's best fires again
        state, alarm = observe(CFG, state, step, {"format": 0.1})
    assert alarm.metric == "format" and alarm.since == 20


def test_eval_score_order():
    m = {"solved_by_level": {"easy": 0.9, "hard": 0.1}, "format_by_level": {"easy": 1.0, "hard": 0.5},
         "eval_solved_frac": 0.1, "eval_format_frac": 0.5}
    assert eval_score(m) == ([0.1, 0.9, 0.75], ["hard", "easy", "format"])
    assert better([0.1, 0.9, 0.7], None) and better([0.2, 0.0, 0.0], [0.1, 0.9, 1.0])
    assert not better([0.1, 0.9, 0.75], [0.1, 0.9, 0.75])  # a tie is not an improvement
    assert eval_score({"eval_solved_frac": 0.5, "eval_format_frac": 1.0}) == ([0.5, 1.0], ["solved", "format"])


@pytest.mark.parametrize("bad_value", [{"action": "panic"}, {"patience": 0}, {"warmup_steps": -1},
                                       {"max_rollbacks": -1}, {"max_bad_steps": 0}])
def test_bad_config(bad_value):
    with pytest.raises(ValueError):
        GuardConfig(**bad_value)


def _evals(out):
    return [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]


def _status(out):
    return json.loads((out / "status.json").read_text())


def _best_of(evals):
    best = None
    for e in evals:
        if better(eval_score(e)[0], best and eval_score(best)[0]):
            best = e
    return best


def test_best_is_saved_when_the_score_improves_and_survives_resume(tmp_path):
    """Evals every step of the toy loop: best/ holds the step whose eval scored best (eval.jsonl, compared in
    order), status.json says so, and a run resumed half way ends with the same best as an uninterrupted one."""
    args = dict(eval_every=1, eval_size=8)
    whole = tmp_path / "whole"
    train(*_setup(whole, steps=6, **args), echo=lambda s: None)
    evals, status = _evals(whole), _status(whole)
    best = _best_of(evals)
    assert status["best_step"] == best["step"] and status["best_score"] == eval_score(best)[0]
    assert sorted(int(p.name) for p in (whole / BEST_DIR).iterdir() if p.name.isdigit()) == [best["step"]]
    cut = tmp_path / "cut"
    train(*_setup(cut, steps=3, **args), echo=lambda s: None)
    train(*_setup(cut, steps=6, **args), echo=lambda s: None)
    assert [eval_score(e)[0] for e in _evals(cut)] == [eval_score(e)[0] for e in evals]  # resume is exact
    assert _status(cut)["best_step"] == best["step"]


def test_damaged_best_is_set_aside(tmp_path):
    out = tmp_path / "run"
    train(*_setup(out, steps=2, eval_every=1, eval_size=8), echo=lambda s: None)
    (step_dir,) = [p for p in (out / BEST_DIR).iterdir() if p.name.isdigit()]
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"torn")
    said = []
    train(*_setup(out, steps=3, eval_every=1, eval_size=8), echo=said.append)
    assert any("is damaged" in s and BEST_DIR in s for s in said)
    assert (out / "damaged_checkpoints").is_dir() and _status(out)["best_step"] == 3


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    """24 steps of the toy loop at lr 1e-2 (evals every 2, 8 held-out prompts), no HF export (so final_hf/ and
    best_hf/ in a push test are that run's own): the run the push tests continue, each in its own copy."""
    out = tmp_path_factory.mktemp("learned") / "run"
    train(*_setup(out, steps=24, eval_every=2, eval_size=8), echo=lambda s: None)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_run_that_learns_then_degrades_stops_itself_and_keeps_its_best(learned, tmp_path):
    """The toy reward is learned (lr 1e-2), then the same run is continued with an entropy push (a fixed bonus of
    3 at lr 3e-2; every value stays finite): the completions turn to noise, the guard stops it with a line naming
    entropy or format, state "stopped", and best_hf/ holds the learned model: loaded back, its greedy held-out
    score is status.json's, and final_hf/ (the last step's model) scores otherwise."""
    out = _copy(learned, tmp_path)
    args = dict(eval_every=2, eval_size=8, export_hf=True)
    score = _status(out)["best_score"]
    assert score[0] > 0 or score[1] > 0.5  # the toy reward was learned: solved or formatted at eval
    cfg, params, task, gcfg, rollout, tcfg, mesh = _setup(out, steps=80, **args)
    said = []
    push = dataclasses.replace(gcfg, learning_rate=0.03, entropy_coef=3.0)
    train(cfg, params, task, push, rollout, tcfg, mesh, echo=said.append)
    status = _status(out)
    assert status["state"] == "stopped" and status["step"] < 80
    line = next(s for s in said if s.startswith("guard: "))
    assert ("entropy" in line or "format" in line) and "best model" in line and status["reason"] == line
    assert (out / "final_hf").is_dir() and (out / "best_hf").is_dir()
    best_cfg, best_params = model.load_hf_checkpoint(out / "best_hf")
    from grpo.evaluation import evaluate

    metrics, _ = evaluate(best_params, best_cfg, LowIdTask(max_new=8), rollout)
    assert eval_score(metrics)[0] == pytest.approx(status["best_score"], abs=1e-6)
    last_cfg, last = model.load_hf_checkpoint(out / "final_hf")
    assert eval_score(evaluate(last, last_cfg, LowIdTask(max_new=8), rollout)[0])[0] != status["best_score"]


def test_rollback_restores_the_best_and_lowers_the_learning_rate(learned, tmp_path):
    """--guard_action rollback: the first alarm restores best/ (its params, so the next step's rewards are the
    learned policy's again) and halves the learning rate; the push goes on, the second alarm finds no rollback
    left (max_rollbacks 1) and stops the run."""
    out = _copy(learned, tmp_path)
    args = dict(eval_every=2, eval_size=8)
    guard = GuardConfig(action="rollback", max_rollbacks=1)
    cfg, params, task, gcfg, rollout, tcfg, mesh = _setup(out, steps=80, guard=guard, **args)
    said = []
    train(cfg, params, task, dataclasses.replace(gcfg, learning_rate=0.03, entropy_coef=3.0), rollout, tcfg, mesh,
          echo=said.append)
    rolled = [s for s in said if "rolled back to the best model" in s]
    assert len(rolled) == 1 and "learning rate 0.015" in rolled[0] and "(rollback 1 of 1)" in rolled[0]
    stop = [s for s in said if s.startswith("guard: ") and "stopped after step" in s]
    assert len(stop) == 1 and said.index(stop[0]) > said.index(rolled[0])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = sorted({round(m["learning_rate"], 6) for m in metrics if m["step"] > 24})
    assert lrs == [0.015, 0.03]
    assert _status(out)["state"] == "stopped"


def test_a_rollback_is_checkpointed_so_a_kill_cannot_replay_it(tmp_path, monkeypatch):
    """Scripted evals (step -> solved, format): format falls 0.4 at step 3 (rollback to step 1's best), step 4
    scores a new best. A run killed after step 4's best/ write, before step 4's checkpoint, resumed from step 2's,
    replayed the rollback against step 4's best/ (other weights). The rollback now checkpoints at once: the
    resumed run ends with the uninterrupted run's params."""
    import grpo.trainer as trainer

    script = {0: (0.0, 0.5), 1: (0.1, 0.6), 2: (0.1, 0.6), 3: (0.0, 0.2), 4: (0.3, 0.7), 5: (0.3, 0.7)}
    at = [0]
    real_eval_phase, real_checkpoint = trainer.eval_phase, trainer.checkpoint_phase

    def scripted_eval_phase(ctx, state):
        at[0] = state.step
        return real_eval_phase(ctx, state)

    def scripted_evaluate(*args, **kwargs):
        solved, fmt = script[at[0]]
        return {"eval_solved_frac": solved, "eval_format_frac": fmt, "eval_reward_mean": 0.0}, []

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    monkeypatch.setattr(trainer, "eval_phase", scripted_eval_phase)
    guard = GuardConfig(warmup_steps=0, patience=1, action="rollback")

    def run(out, kill_at=None):
        def checkpoint(ctx, state):
            if state.step == kill_at:
                raise KeyboardInterrupt  # the kill: after best/ was written at this step, before its checkpoint
            real_checkpoint(ctx, state)

        monkeypatch.setattr(trainer, "checkpoint_phase", checkpoint)
        said = []
        try:
            return train(*_setup(out, steps=5, eval_size=8, eval_every=1, guard=guard), echo=said.append), said
        except KeyboardInterrupt:
            return None, said

    whole, said = run(tmp_path / "whole")
    assert any("rolled back to the best model (step 1)" in s for s in said), said
    run(tmp_path / "cut", kill_at=4)
    resumed, said = run(tmp_path / "cut")
    assert any("resumed from" in s and "checkpoints/3" in s for s in said), said  # the rollback's own checkpoint
    same = jax.tree.map(lambda a, b: bool((a == b).all()), whole["params"], resumed["params"])
    assert all(jax.tree.leaves(same))


def test_the_count_of_nonfinite_steps_survives_a_resume(tmp_path, monkeypatch):
    """Every step reported as skipped for a non-finite loss (the counter is what is tested): max_bad_steps 3 stops the
    run after step 3 whether or not it was resumed after step 2 (the count was not checkpointed: it stopped
    after step 5)."""
    import grpo.trainer as trainer

    real = trainer.update_phase

    def skipped(ctx, params, opt_state, batch):
        params, opt_state, metrics = real(ctx, params, opt_state, batch)  # the step donates the old params
        return params, opt_state, {**metrics, "skipped": 1.0}

    monkeypatch.setattr(trainer, "update_phase", skipped)
    out = tmp_path / "run"
    train(*_setup(out, steps=2), echo=lambda s: None)
    assert _status(out)["state"] == "finished"
    said = []
    train(*_setup(out, steps=6), echo=said.append)
    assert _status(out)["state"] == "stopped" and _status(out)["step"] == 3, said
    assert any("3 non-finite steps in a row" in s for s in said)


def test_best_of_a_step_already_saved_is_replaced(tmp_path):
    """A run killed before its first checkpoint evaluates step 0 again on the next start; an eval that scores
    better (other settings) saves best/ at step 0 once more: orbax refused ("Checkpoint for step 0 already
    exists") and the run failed at every start."""
    from grpo.best_model import BestCheckpointer

    params, opt_state = {"w": jax.numpy.zeros(3)}, {"m": jax.numpy.zeros(3)}
    best = BestCheckpointer(tmp_path)
    best.save(0, params, opt_state, {"step": 0, "score": [0.1]})
    best.save(0, {"w": jax.numpy.ones(3)}, opt_state, {"step": 0, "score": [0.5]})
    assert best.record(say=lambda s: None)["score"] == [0.5]
    step, restored, _, _ = best.restore(params, opt_state, say=lambda s: None)
    assert step == 0 and float(restored["w"].sum()) == 3.0
    best.close()
