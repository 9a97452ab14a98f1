"""Around the loop's steps: when to pause (StopClock: a time limit, SIGTERM, Ctrl-C) and what to trace (Profiler).

Free notebooks end sessions after 9-12 h and send SIGTERM first; a run that pauses cleanly, checkpointed, is
continued by re-running the same command.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax


class StopClock:
    """When to pause a run early, checkpointed, so re-running the same command continues: on SIGTERM (notebook
    and cluster shutdowns send it first) or Ctrl-C (SIGINT; a notebook's interrupt button sends it), or when the
    next step and the checkpoint written at the pause would not end before the time limit (free notebooks end
    sessions after 9-12 h). The signal only sets a flag; the step in flight finishes first. A second Ctrl-C stops
    at once (KeyboardInterrupt), losing the steps since the last checkpoint, as Ctrl-C always did.

    The next step is estimated from the recent steps' median, leaving out the first step (it compiles, and can
    take several steady steps' time); twice the median, so steps up to twice the recent typical length (a long
    sampling round) still fit. The checkpoint's cost is the longest one measured so far, with its wait for the
    write (`checkpointing(wait)`); until one is measured, `checkpoint_bytes` written at CHECKPOINT_BYTES_PER_S (a
    run whose first periodic checkpoint is 50 steps away still saves one to pause). When a held-out eval follows
    the next step, the longest eval measured counts too (`evaluating()`; at first the step-0 eval's `eval_s`,
    compiles included). The limit counts from `start` (the trainer passes the time train() began: compiles and
    the step-0 eval count). `now` is the clock (a fake one in tests).
    """

    MARGIN = 2.0  # the next step must fit twice over its recent median
    WINDOW = 8  # recent steps whose median is taken
    # The guess for a checkpoint not yet measured: a slow disk's rate (a notebook's network-backed drive), so the
    # first pause is early rather than late; the first measured write replaces it.
    CHECKPOINT_BYTES_PER_S = 100e6

    def __init__(self, time_limit_s: float | None, now: Callable[[], float] = time.monotonic,
                 start: float | None = None, checkpoint_bytes: int = 0, eval_s: float = 0.0):
        self.now, self.limit = now, time_limit_s
        self.signalled: str | None = None  # the name of the signal received
        self.stop_now = False  # a second Ctrl-C
        self._last = now()
        self.start = self._last if start is None else start
        self.steps: list[float] = []  # seconds between consecutive step_done calls (the first: since start)
        self.checkpoint_s: float | None = None  # the longest checkpoint write measured
        self.checkpoint_guess_s = checkpoint_bytes / self.CHECKPOINT_BYTES_PER_S
        self.eval_s = eval_s  # the longest held-out eval measured
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signalled == "SIGINT":
            self.stop_now = True  # raised again at the step's end if the code it lands in swallows it
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("Ctrl-C: pausing after this step with a checkpoint (re-run the same command to continue); Ctrl-C "
                  "again stops at once, losing the steps since the last checkpoint", file=sys.stderr, flush=True)

    def step_done(self) -> None:
        now = self.now()
        self.steps.append(now - self._last)
        self._last = now

    @contextlib.contextmanager
    def checkpointing(self, wait: Callable[[], None] | None = None):
        """Times a checkpoint write: the pause writes one, so its cost is part of what must fit. An asynchronous
        save returns once its arrays are copied; `wait` (the checkpointer's) makes the time the whole write."""
        began = self.now()
        try:
            yield
            if wait is not None:
                wait()
        finally:
            self.checkpoint_s = max(self.checkpoint_s or 0.0, self.now() - began)

    @contextlib.contextmanager
    def evaluating(self):
        """Times a held-out eval: one that follows the next step is part of what must fit before the pause."""
        began = self.now()
        try:
            yield
        finally:
            self.eval_s = max(self.eval_s, self.now() - began)

    def next_step_s(self) -> float:
        """The time the next step is planned to take: MARGIN x the median of the last WINDOW steps after the
        first (the first alone while it is the only one)."""
        if not self.steps:
            return 0.0
        recent = self.steps[1:][-self.WINDOW:] or self.steps
        return self.MARGIN * statistics.median(recent)

    def reason_to_stop(self, eval_next: bool = False) -> str | None:
        """Why to pause before the next step (followed by an eval when `eval_next`), or None; after a second
        Ctrl-C, KeyboardInterrupt (a library that caught the one raised in its code must not turn "stop at once"
        into a pause)."""
        if self.stop_now:
            raise KeyboardInterrupt
        if self.signalled:
            return f"{self.signalled} received"
        after = (self.checkpoint_guess_s if self.checkpoint_s is None else self.checkpoint_s) + (
            self.eval_s if eval_next else 0.0)
        if self.limit is not None and self.now() - self.start + self.next_step_s() + after > self.limit:
            return f"the next step would end past --time_limit ({self.limit:.0f} s)"
        return None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Profiler:
    """jax.profiler.trace over loop steps A..B, counted from 0 (loop step A writes step=A+1 in metrics.jsonl),
    into <output_dir>/profile."""

    def __init__(self, window: tuple[int, int] | None, out: Path, say: Callable[[str], None] = print):
        self.window, self.out, self.active, self.say = window, out, False, say

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(str(self.out))
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            a, b = self.window
            self.say(f"jax.profiler trace of loop steps {a}..{b} (metrics.jsonl steps {a + 1}..{b + 1}) in {self.out}; "
                     f"bin/profile_ops {self.out} sums it per op")
