import datetime as dt

import pytest

from lingmao.train.night import NightMode, in_window, parse_hhmm


class Clock:
    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


def t(s: str) -> dt.time:
    return parse_hhmm(s, "x")


@pytest.mark.parametrize(
    "now, inside",
    [
        ("20:59", False),
        ("21:00", True),
        ("23:59", True),
        ("00:00", True),
        ("07:59", True),
        ("08:00", False),
        ("12:00", False),
    ],
)
def test_window_wraps_past_midnight(now, inside):
    assert in_window(t(now), t("21:00"), t("08:00")) is inside


def test_window_within_a_day():
    assert in_window(t("13:00"), t("12:00"), t("14:00"))
    assert not in_window(t("14:00"), t("12:00"), t("14:00"))


def test_crossing_21_00_halves_batch_threads_and_memory_then_restores():
    clock = Clock(dt.datetime(2026, 1, 1, 20, 59, 30))
    night = NightMode(True, "21:00", "08:00", micro_batch=8, threads=4, clock=clock)
    day, changed = night.settings()
    assert changed and (day.chunks, day.threads, day.memory_fraction) == (1, 4, 1.0)
    assert night.settings()[1] is False  # no change, no log line
    clock.now += dt.timedelta(seconds=45)
    s, changed = night.settings()
    assert changed and (s.chunks, s.threads, s.memory_fraction) == (2, 2, 0.5)
    clock.now = dt.datetime(2026, 1, 2, 8, 0, 0)
    s, changed = night.settings()
    assert changed and s.chunks == 1


def test_disabled_never_switches():
    night = NightMode(False, "21:00", "08:00", 8, 2, clock=lambda: dt.datetime(2026, 1, 1, 23, 0))
    assert night.settings()[0].chunks == 1


def test_odd_micro_batch_is_not_split():
    night = NightMode(True, "21:00", "08:00", 3, 2, clock=lambda: dt.datetime(2026, 1, 1, 23, 0))
    assert night.settings()[0].chunks == 1


def test_bad_time_names_the_key():
    with pytest.raises(ValueError, match="night.start"):
        NightMode(True, "9pm", "08:00", 8, 2)


def test_a_run_crossing_21_00_switches_and_keeps_the_maths(tmp_path, shared_cache, monkeypatch, capsys):
    import torch
    from test_resume import train_here

    from lingmao.train import checkpoint, engine

    n = torch.get_num_threads()
    # AdamW: Muon's bf16 orthogonalisation would turn the chunks' last-bit differences into ~1e-4
    base = ["trainer.max_steps=6", "tracking.enabled=false", "model.dropout=0.0", "hardware.threads=2", "optim=adamw"]
    day = train_here(tmp_path, tmp_path / "day", *base)
    clock = Clock(dt.datetime(2026, 1, 1, 20, 58))

    def tick():
        clock.now += dt.timedelta(seconds=30)
        return clock.now

    monkeypatch.setattr(engine, "wall_clock", tick)
    night = train_here(tmp_path, tmp_path / "night", *base, "night_mode=true")
    torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "night mode on at step" in out and "micro-batch 2, threads 1" in out
    assert night["train/loss"] == pytest.approx(day["train/loss"], rel=1e-5)
    a = checkpoint.load(tmp_path / "day" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "night" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
