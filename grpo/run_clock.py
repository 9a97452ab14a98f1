"""Around the loop's steps: when to pause (StopClock: a time limit, SIGTERM) and what to trace (Profiler).

Free notebooks end sessions after 9-12 h and send SIGTERM first; a run that pauses cleanly, checkpointed, is
continued by re-running the same command.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import jax


class StopClock:
    """When to pause a run early, checkpointed, so re-running the same command continues: on SIGTERM (notebook
    and cluster shutdowns send it first), or when the next step would not end before the time limit (free
    notebooks end sessions after 9-12 h). The signal only sets a flag; the step in flight finishes first."""

    MARGIN = 2.0  # the next step must fit twice over: steps vary, and the checkpoint write needs time too

    def __init__(self, time_limit_s: float | None):
        self.start, self.limit, self.longest, self.signalled = time.monotonic(), time_limit_s, 0.0, False
        self._last = self.start
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def step_done(self) -> None:
        now = time.monotonic()
        self.longest, self._last = max(self.longest, now - self._last), now

    def reason_to_stop(self) -> str | None:
        if self.signalled:
            return "SIGTERM received"
        if self.limit is not None and time.monotonic() - self.start + self.MARGIN * self.longest > self.limit:
            return f"the next step would end past --time_limit ({self.limit:.0f} s)"
        return None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Profiler:
    """jax.profiler.trace over loop steps A..B, counted from 0 (loop step A writes step=A+1 in metrics.jsonl),
    into <output_dir>/profile."""

    def __init__(self, window: tuple[int, int] | None, out: Path):
        self.window, self.out, self.active = window, out, False

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
