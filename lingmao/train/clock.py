"""trainer.max_time is the run's wall time: from the start of the command
(lingmao.run imports this module first) to its exit, with the calibration,
compilation, evaluations and final samples inside it. Only a first-ever
corpus download and preparation is left out (`outside`)."""

from __future__ import annotations

import time

_started = time.monotonic()  # the command's start: when lingmao.run imported this module
_outside = 0.0
_command = False  # run.main() began: the first job's budget counts from _started


def command_started() -> None:
    global _command
    _command = True


def job_started() -> None:
    """A run begins (run.execute): the command's first counts from the
    command's start, any later one (the next job of a multirun in this
    process, a test) from now."""
    global _started, _outside, _command
    if not _command:
        _started, _outside = time.monotonic(), 0.0
    _command = False


def spent() -> float:
    """Seconds of the budget this run has used so far."""
    return time.monotonic() - _started - _outside


def outside(seconds: float) -> None:
    """`seconds` that do not count against trainer.max_time (a corpus prepared for the first time)."""
    global _outside
    _outside += seconds


# Seconds kept for what follows the final checkpoint: the run's artifacts,
# its MLflow model and the store's last writes.
END_SECONDS = 10.0


class Budget:
    """trainer.max_time as the training loop sees it: training stops once the
    time trained, this process's start-up before the loop (`begin`) and what
    the end still needs (the final eval, checkpoint and END_SECONDS; the
    plan's guess until one of each was timed) fill it. The LR schedule's time
    clock ends there too (`reserved`, for Schedule.lr)."""

    def __init__(self, max_time: float | None, eval_guess: float):
        self.max_time = max_time
        self.before, self.eval, self.save = 0.0, eval_guess, 0.0
        self._evals: list[float] = []

    def begin(self) -> None:
        self.before = spent()

    def timed(self, eval_seconds: float | None = None, save_seconds: float | None = None) -> None:
        """An eval or a checkpoint write just took this long: the end will take as long."""
        if eval_seconds is not None:
            self._evals.append(eval_seconds)
            self.eval = max(self._evals[-3:])
        if save_seconds is not None:
            self.save = max(self.save, save_seconds)

    @property
    def after(self) -> float:
        return self.eval + self.save + END_SECONDS

    @property
    def reserved(self) -> float:
        return self.before + self.after

    def out(self, trained: float) -> bool:
        """Whether training must stop now, after `trained` seconds of it (a resumed run's earlier ones too)."""
        return bool(self.max_time) and trained + self.reserved >= self.max_time
