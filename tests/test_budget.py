"""trainer.max_time is the run's wall time: training stops early enough for
the start-up before it and the final eval, checkpoint and end after it, and
the LR's time clock reaches its floor there."""

import pytest

from lingmao.train import clock
from lingmao.train.optim import Schedule


def test_training_stops_so_that_start_up_and_the_end_fit_the_budget(monkeypatch):
    schedule = Schedule.for_run(1e-3, 0, None, 0.1, max_time=100.0)
    monkeypatch.setattr(clock, "spent", lambda: 20.0)  # calibration, corpus, model: 20 s before the loop
    budget = clock.Budget(100.0, eval_guess=5.0)
    budget.begin()
    after = 5.0 + clock.END_SECONDS
    assert not budget.out(100.0 - 20.0 - after - 1) and budget.out(100.0 - 20.0 - after)
    # the LR reaches its floor where training stops, not at 100 s of training
    assert schedule.lr(0, seconds=100.0 - 20.0 - after, reserved=budget.reserved) == pytest.approx(1e-4)
    assert schedule.lr(0, seconds=50.0, reserved=budget.reserved) > 1e-4 * 1.5
    budget.timed(eval_seconds=30.0)  # an eval took 30 s: the final one will too
    budget.timed(save_seconds=4.0)
    assert budget.out(100.0 - 20.0 - 30.0 - 4.0 - clock.END_SECONDS)
    assert budget.reserved == pytest.approx(20.0 + 30.0 + 4.0 + clock.END_SECONDS)


def test_no_time_bound_never_runs_out():
    budget = clock.Budget(None, eval_guess=5.0)
    budget.begin()
    assert not budget.out(1e9)


def test_the_first_run_of_a_command_counts_from_its_start_a_later_one_from_its_own(monkeypatch):
    clock.command_started()
    monkeypatch.setattr(clock, "_started", clock._started - 50.0)  # the command began 50 s ago
    clock.job_started()
    assert clock.spent() >= 50.0
    clock.job_started()  # the next job of a multirun in the same process
    assert clock.spent() < 5.0
    clock.outside(-10.0)  # seconds taken out (a corpus prepared for the first time) do not count
    assert clock.spent() >= 10.0
    clock.job_started()
