"""SIGINT/SIGTERM during training: finish the step, checkpoint, stop; a
step that cannot end soon is abandoned instead."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

from lingmao.plan.summary import duration

# Seconds a first signal waits for the step in progress. Schedulers send
# SIGKILL some seconds after SIGTERM (SLURM's KillWait and Kubernetes' grace
# period: 30 s by default): a step that would run past this is lost either
# way, so when no finished step is left unsaved it is abandoned, and the run
# is at least marked KILLED.
GRACE = 20.0
# Seconds a signal may wait for Python's handler: one that has not run by then
# is held up by one long C call (a torch op over a huge context, a backward
# pass), which nothing can interrupt but ending the process.
STUCK = 10.0
_on_stuck: Callable[[], None] | None = None


def when_stuck(callback: Callable[[], None] | None) -> None:
    """What to do (mark the MLflow run KILLED) before a stuck step's process ends: see STUCK."""
    global _on_stuck
    _on_stuck = callback


class StepAbandoned(KeyboardInterrupt):
    """A first signal stopped the run inside a step that could not end soon:
    no checkpoint of it; the last one written stays the newest."""


class Stopper:
    """Within `with Stopper() as s:` a first SIGINT or SIGTERM sets
    `s.requested`; a second one raises KeyboardInterrupt at once. Inside
    `with s.step():`, while `nothing_to_lose()` (no step finished since the
    start or the last checkpoint), a first signal whose step would not end
    within `grace` seconds (by `step_estimate`, then by the last step's time)
    raises StepAbandoned at once, and one whose step overruns `grace` then."""

    def __init__(
        self,
        step_estimate: float | None = None,
        grace: float | None = None,
        nothing_to_lose: Callable[[], bool] = lambda: True,
    ):
        self.requested = False
        self.nothing_to_lose = nothing_to_lose
        self.grace = GRACE if grace is None else grace
        self._estimate = step_estimate  # seconds a step takes: the plan's, then the last one measured
        self._measured = False
        self._started: float | None = None  # when the step in progress began; None between steps
        self._overdue = False  # the grace is over: the next handler call abandons the step
        self._timer: threading.Timer | None = None
        self._old = {}
        self._handled = 0  # signals Python's handler has seen; the watcher counts those that arrived

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        # The C-level handler writes each signal's number here at once, even while the main thread is in C.
        self._wake, write = os.pipe()
        os.set_blocking(write, False)
        self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wake_write = write
        threading.Thread(target=self._watch, name="lingmao-signals", daemon=True).start()
        return self

    @contextlib.contextmanager
    def step(self):
        """A training step: the one part of the loop a first signal may cut short.
        Evals and checkpoint writes are never cut short by it."""
        self._started = time.monotonic()
        try:
            yield
        finally:
            self._estimate, self._measured = time.monotonic() - self._started, True
            self._started = None
            if self._timer:
                self._timer.cancel()

    def _handle(self, signum, frame):
        self._handled += 1
        name = signal.Signals(signum).name
        if self._overdue:
            self._overdue = False
            raise StepAbandoned("stopped without finishing the step in progress")
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        started, left = self._started, None
        if started is not None and self._estimate is not None:
            left = started + self._estimate - time.monotonic()
        # os.write, not print: a handler may run in the middle of a print.
        if started is not None and not self.nothing_to_lose():
            more = f"; it needs ~{duration(left)} more" if left is not None and left > self.grace else ""
            os.write(
                2,
                f"\n{name}: stopping after this step with a checkpoint{more} (again to stop at once, losing the "
                f"steps since the last checkpoint)\n".encode(),
            )
            return
        if left is not None and left > self.grace:
            os.write(
                2,
                f"\n{name}: the step in progress needs ~{duration(left)} more "
                f"({'by the last step' if self._measured else 'plan estimate'}); stopping now "
                f"without finishing it\n".encode(),
            )
            raise StepAbandoned("stopped without finishing the step in progress")
        os.write(2, f"\n{name}: stopping after this step with a checkpoint (again to stop at once)\n".encode())
        if started is not None:
            self._timer = threading.Timer(self.grace, self._past_grace, (started, signum, name))
            self._timer.daemon = True
            self._timer.start()

    def _past_grace(self, started: float, signum: int, name: str) -> None:
        """On the timer's thread: the step that was running at the signal still runs."""
        if self._started != started:
            return
        os.write(
            2, f"\n{name}: the step did not end within {self.grace:g} s; stopping now without finishing it\n".encode()
        )
        self._overdue = True
        signal.raise_signal(signum)  # the handler runs on the main thread, between two of the step's operations

    def _watch(self) -> None:
        """On its own thread: a signal whose handler has not run STUCK seconds on
        (its step is in one long C call) ends the process, if the step could be
        abandoned: nothing to lose, and it would not end within the grace, or
        has run past it."""
        arrived = 0
        while True:
            got = os.read(self._wake, 64)
            if not got or self._wake_write < 0:
                os.close(self._wake)
                return
            arrived += sum(b in (signal.SIGINT, signal.SIGTERM) for b in got)
            started, at = self._started, time.monotonic()
            time.sleep(STUCK)
            ends = started + self._estimate if started is not None and self._estimate is not None else at
            if ends <= at + self.grace and not self._overdue:  # it may end soon yet: wait out the grace first
                time.sleep(max(0.0, at + self.grace - time.monotonic()))
            stuck = self._handled < arrived and started is not None and self._started == started
            if stuck and self.nothing_to_lose():
                self._end_stuck()

    def _end_stuck(self) -> None:
        os.write(
            2,
            f"\nthe step is inside one long operation that a signal cannot interrupt ({STUCK:g} s without an "
            f"answer); ending the process now, without finishing the step\n".encode(),
        )
        try:
            if _on_stuck:
                _on_stuck()
        finally:
            os._exit(130)  # the main thread is inside C: nothing but the end of the process stops it

    def __exit__(self, *exc):
        if self._timer:
            self._timer.cancel()
        signal.set_wakeup_fd(self._old_wakeup)
        write, self._wake_write = self._wake_write, -1
        os.write(write, b"\0")  # wakes the watcher, which then sees it is over
        os.close(write)
        for s, h in self._old.items():
            signal.signal(s, h)
