"""The time limit's pause decision (grpo/run_clock.py StopClock) on a fake clock.

Reference: a simulated loop whose step and checkpoint durations are given (the first step compiles), with a
checkpoint every 5 steps and one more at the pause, as grpo/trainer.py writes them.
"""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest

from grpo.run_clock import StopClock


def _simulate(durations, limit: float, checkpoint_s: float = 2.0, checkpoint_every: int = 5,
              checkpoint_bytes: int = 0, eval_every: int = 0, eval_s: float = 0.0,
              count_evals: bool = True) -> tuple[int, float]:
    """(steps run, time when the pause's checkpoint is written). Evals (eval_s each, after every eval_every-th
    step) are timed by the clock unless count_evals is False (the clock before it counted them)."""
    now = [0.0]
    clock = StopClock(limit, now=lambda: now[0], checkpoint_bytes=checkpoint_bytes)
    steps = 0
    try:
        for seconds in durations:
            eval_next = bool(eval_every) and (steps + 1) % eval_every == 0
            if clock.reason_to_stop(eval_next and count_evals):
                break
            now[0] += seconds
            clock.step_done()
            steps += 1
            if eval_every and steps % eval_every == 0:
                with clock.evaluating() if count_evals else contextlib.nullcontext():
                    now[0] += eval_s
            if steps % checkpoint_every == 0:
                with clock.checkpointing():
                    now[0] += checkpoint_s
        with clock.checkpointing():  # the pause (or the end) writes a checkpoint
            now[0] += checkpoint_s
    finally:
        clock.close()
    return steps, now[0]


def test_a_slow_first_step_does_not_shorten_the_run():
    """A 40 s first step (the compile), then 14 s steps, 2 s checkpoints, limit 150 s: at least 7 steps run (the
    longest-step rule it replaces planned every step at 2 x 40 s and paused after 3), and the run ends in time."""
    steps, end = _simulate([40.0] + [14.0] * 20, limit=150)
    assert steps >= 7
    assert end <= 150


@pytest.mark.parametrize("seed", range(50))
def test_steps_jittering_30_percent_never_end_past_the_limit(seed):
    """Steps drawn uniformly within +-30% of 14 s (after a 40 s first one), limits from 150 s to 600 s: the pause's
    checkpoint is always written before the limit, and the run does not pause more than 3 steps early."""
    rng = np.random.default_rng(seed)
    limit = float(rng.uniform(150, 600))
    durations = [40.0] + list(14.0 * rng.uniform(0.7, 1.3, 100))
    steps, end = _simulate(durations, limit=limit)
    assert end <= limit, (steps, end, limit)
    assert end + 3 * 1.3 * 14 + 2 > limit  # it used the time it had, give or take three long steps


def test_sigterm_pauses_at_once():
    clock = StopClock(None)
    try:
        assert clock.reason_to_stop() is None
        clock._on_signal(signal.SIGTERM, None)
        assert clock.reason_to_stop() == "SIGTERM received"
    finally:
        clock.close()


def test_ctrl_c_pauses_and_a_second_stops_at_once(capsys):
    """A notebook's interrupt button or Ctrl-C: the first pauses after the step (checkpointed, like SIGTERM) and
    says so; the second raises KeyboardInterrupt as Ctrl-C always did, and again at the step's end should the first
    be caught (one of three tries paused instead of stopping). close() gives back the handlers it took."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    clock = StopClock(None)
    try:
        clock._on_signal(signal.SIGINT, None)
        assert clock.reason_to_stop() == "SIGINT received"
        assert "Ctrl-C: pausing after this step" in capsys.readouterr().err
        try:  # the second Ctrl-C's KeyboardInterrupt, caught where it landed (a library's broad except)
            clock._on_signal(signal.SIGINT, None)
            raise AssertionError("the second Ctrl-C raised nothing")
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):  # the step's end stops the run rather than pausing it
            clock.reason_to_stop()
    finally:
        clock.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_pause_before_the_first_checkpoint_counts_the_state_it_writes():
    """A 30 s checkpoint every 50 steps (a large state on a slow disk): the pause at a 150 s limit comes before any
    periodic checkpoint was measured; without a guess from the state's size it ended at 154 s, past the limit.
    Reference: 3 GB at StopClock.CHECKPOINT_BYTES_PER_S (100 MB/s) is a 30 s guess."""
    assert _simulate([40] + [14] * 100, 150, checkpoint_s=30, checkpoint_every=50) == (7, 154.0)  # no guess
    steps, end = _simulate([40] + [14] * 100, 150, checkpoint_s=30, checkpoint_every=50, checkpoint_bytes=3 * 10**9)
    # 5 steps end at 96 s; a sixth is planned at twice the median: 96 + 28 + 30 > 150, so the pause writes at 96 s
    assert (steps, end) == (5, 126.0)


def test_an_eval_after_the_next_step_counts_once_one_was_timed():
    """Reference: a 40 s first step, then 10 s steps, a 35 s eval after every 3rd step, 2 s checkpoints every 3
    steps, limit 150 s. An eval longer than the margin (twice a step's median) ran past it: step 6 and its eval
    ended the run at 166 s; with the longest measured eval counted before a step an eval follows, the pause
    comes before step 6 (117 + 20 + 2 + 35 > 150), its checkpoint at 119 s. Jittered steps and evals never end
    past the limit."""
    base = dict(checkpoint_every=3, eval_every=3, eval_s=35.0)
    assert _simulate([40] + [10] * 20, 150, count_evals=False, **base) == (6, 166.0)
    assert _simulate([40] + [10] * 20, 150, **base) == (5, 119.0)
    rng = np.random.default_rng(1)
    for _ in range(50):
        steps = [40.0] + list(rng.uniform(7, 13, 30))
        assert _simulate(steps, 200, eval_s=float(rng.uniform(20, 40)), eval_every=3, checkpoint_every=3)[1] <= 200


def test_the_limit_counts_from_the_start_given_and_a_checkpoint_with_its_wait():
    """The trainer starts the clock when train() begins: 100 s of compiles and step-0 eval before the first step
    count against a 150 s limit (before, the clock began at the first step and `--time_limit 1s` ran 10 s). A
    checkpoint's cost includes the wait for its asynchronous write."""
    now = [100.0]
    clock = StopClock(150, now=lambda: now[0], start=0.0)
    try:
        assert clock.reason_to_stop() is None  # nothing measured yet: the first step may start
        now[0] += 40.0
        clock.step_done()
        with clock.checkpointing(wait=lambda: now.__setitem__(0, now[0] + 5.0)):  # the write finishes 5 s later
            now[0] += 1.0
        assert clock.checkpoint_s == 6.0
        assert clock.reason_to_stop().startswith("the next step would end past --time_limit")  # 146 + 80 + 6 > 150
    finally:
        clock.close()
