"""CPU precision and compile by measurement: the decision rule, the cache,
the short-run rule, one real (small) measurement, and the plan's use of it."""

import time

import pytest
from test_config import make

from lingmao.plan import calibration as calibrate
from lingmao.plan.machine import Machine
from lingmao.plan.make import make_plan
from lingmao.train import calibrate as timing

MODEL = {
    "d_model": 32,
    "n_heads": 2,
    "n_layers": 1,
    "context_length": 16,
    "dropout": 0.0,
    "mlp_ratio": 4,
    "rotary": True,
    "qk_norm": False,
    "mlp": "gelu",
    "vocab_multiple": 1,
    "zero_init_proj": False,
    "moe": {"experts": 0, "top_k": 2, "capacity_factor": 1.25, "aux_loss_weight": 0.01},
}
SHAPE = calibrate.shape_of(MODEL, 50, 1, "muon")
EVERY = calibrate.allowed("auto", "auto")
CPU = Machine(cores=2, ram_gb=16.0)


def fake_measure(calls):
    def measure(shape, candidates):
        calls.append(list(candidates))
        return {calibrate.name(p, c): (0.5 if p == "bf16" else 1.0) for p, c in candidates}

    return measure


def test_the_fastest_wins_only_beyond_the_noise_margin():
    s = {"fp32": 1.0, "bf16": 0.97, "fp32+compile": 0.99, "bf16+compile": 0.96}
    assert calibrate.decide(s, list(calibrate.CANDIDATES))["precision"] == "fp32"  # 4% faster: noise
    s["bf16+compile"] = 0.5
    d = calibrate.decide(s, list(calibrate.CANDIDATES))
    assert (d["precision"], d["compile"], d["speedup"]) == ("bf16", True, pytest.approx(2.0))
    d = calibrate.decide({**s, "bf16": 0.8}, calibrate.allowed("auto", False))  # compile fixed off
    assert (d["precision"], d["compile"]) == ("bf16", False)
    # a candidate that failed to build (no C++ compiler) has no time and cannot win
    d = calibrate.decide({"fp32": 1.0, "bf16": 0.9}, list(calibrate.CANDIDATES))
    assert (d["precision"], d["compile"]) == ("bf16", False)


def test_measured_once_per_cpu_torch_and_shape_then_cached(tmp_path):
    calls = []
    first = calibrate.choose(SHAPE, EVERY, tmp_path, None, fake_measure(calls))
    again = calibrate.choose(SHAPE, EVERY, tmp_path, None, fake_measure(calls))
    assert len(calls) == 1 and len(calls[0]) == 4
    assert first["precision"] == again["precision"] == "bf16"
    assert (first["how"], again["how"]) == ("measured", "cached")
    other = calibrate.shape_of({**MODEL, "context_length": 8}, 50, 1, "muon")
    calibrate.choose(other, calibrate.allowed("auto", False), tmp_path, None, fake_measure(calls))
    assert len(calls) == 2 and all(not c for _, c in calls[1])  # compile fixed off: not measured


def test_a_short_run_measures_nothing_but_reads_the_cache(tmp_path):
    calls = []
    short = calibrate.choose(SHAPE, EVERY, tmp_path, 30.0, fake_measure(calls))
    assert calls == [] and (short["precision"], short["compile"], short["how"]) == ("fp32", False, "too short")
    calibrate.choose(SHAPE, EVERY, tmp_path, 3600.0, fake_measure(calls))
    assert calibrate.choose(SHAPE, EVERY, tmp_path, 30.0, fake_measure(calls))["how"] == "cached"
    assert len(calls) == 1


def test_a_real_measurement_times_the_runs_own_step(monkeypatch):
    """The calibration trains the step the run takes: the engine's builder,
    the run's optimizer (Muon by default), its loss, at each candidate."""
    cfg = make("hardware=cpu", "model=tiny")
    plan = make_plan(cfg, CPU)
    built = []
    real = timing.build_step

    def spy(cfg, plan, *args, **kwargs):
        parts = real(cfg, plan, *args, **kwargs)
        built.append((plan.precision, type(parts.optimizer).__name__, plan.micro_batch))
        return parts

    monkeypatch.setattr(timing, "build_step", spy)
    shape = calibrate.shape_of(dict(cfg.model), 50, 1, cfg.optim.name)
    seconds = timing.measure_steps(cfg, plan, shape, [("fp32", False), ("bf16", False)], rounds=2)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < v < 10 for v in seconds.values())
    assert built == [("fp32", "MuonAdamW", shape["micro_batch"]), ("bf16", "MuonAdamW", shape["micro_batch"])]


def test_the_plan_takes_the_measured_choice_and_its_time_and_says_so(tmp_path, monkeypatch):
    cfg = make("hardware=cpu", "model=tiny", "trainer.max_time=1800", "trainer.max_steps=null")
    seen = []

    def measure(cfg, plan, shape, candidates, **_):
        seen.append((shape["model"]["context_length"], shape["optimizer"], len(candidates)))
        return fake_measure([])(shape, candidates)

    monkeypatch.setattr(timing, "measure_steps", measure)
    first = make_plan(cfg, CPU)
    assert first.cpu_candidates == EVERY and "not measured" in first.precision_reason
    plan = make_plan(cfg, CPU, cpu_choice=timing.cpu_choice(cfg, first, tmp_path, measure=True))
    assert seen == [(128, "muon", 4)]
    assert (plan.precision, plan.compile, plan.assumed_mfu) == ("bf16", False, None)
    assert "measured on this CPU" in plan.precision_reason and "bf16 2.00x" in plan.precision_reason
    # the fake's 0.5 s per step of 1024 tokens, scaled to the plan's step
    tokens = plan.micro_batch * plan.accumulation * plan.context_length
    assert plan.est_step_seconds == pytest.approx(0.5 * tokens / 1024, rel=1e-3)
    fixed = make_plan(make("hardware=cpu", "model=tiny", "hardware.precision=fp32", "hardware.compile=false"), CPU)
    assert fixed.cpu_candidates == [] and timing.cpu_choice(cfg, fixed, tmp_path, measure=True) is None
    assert len(seen) == 1 and (fixed.precision, fixed.compile) == ("fp32", False)  # nothing left to measure


def test_plan_true_reads_a_calibration_but_measures_none(tmp_path, monkeypatch, capsys):
    from lingmao.run import execute

    monkeypatch.setenv("LINGMAO_CACHE", str(tmp_path / "cache"))
    args = ("hardware=cpu", "model=tiny", "plan=true", "trainer.max_time=3600", "trainer.max_steps=null")
    execute(make(*args), tmp_path, tmp_path / "run")
    assert "not measured yet" in capsys.readouterr().out and not (tmp_path / "cache").exists()
    from omegaconf import OmegaConf

    from lingmao.plan.machine import detect

    shape = calibrate.shape_of(OmegaConf.to_container(make(*args).model), 13563, detect().cores, "muon")
    calibrate.choose(shape, EVERY, tmp_path / "cache", None, fake_measure([]))
    execute(make(*args), tmp_path, tmp_path / "run")
    assert "bf16: cached on this CPU" in capsys.readouterr().out


def fake_stepper(warm: dict[str, float], built: list):
    """_stepper with these seconds per step (slept) for each candidate: what the bound and the early drops decide on."""

    def stepper(cfg, plan, shape, precision, compile_):
        k = calibrate.name(precision, compile_)
        built.append(k)
        return (lambda: time.sleep(warm[k])), warm[k]

    return stepper


def test_candidates_that_cannot_win_are_dropped_without_timing_them(monkeypatch):
    # bf16 eager 3x slower than fp32 (a CPU without bf16 instructions); compile gains 1.25x for fp32:
    # bf16+compile would need a gain of 3/0.8 = 3.75x, so it is not even built.
    built, said = [], []
    steps = {"fp32": 0.02, "bf16": 0.06, "fp32+compile": 0.016}
    monkeypatch.setattr(timing, "_stepper", fake_stepper(steps, built))
    cfg = make("hardware=cpu", "model=tiny")
    seconds = timing.measure_steps(cfg, make_plan(cfg, CPU), SHAPE, EVERY, limit=600, say=said.append)
    assert built == ["fp32", "bf16", "fp32+compile"]
    assert seconds["bf16+compile"] == float("inf") and seconds["bf16"] == 0.06  # its warm step: out of the rounds
    assert any("bf16+compile: not timed, bf16 eager is 3.00x fp32's step" in line for line in said), said
    d = calibrate.decide(seconds, EVERY)
    assert (d["precision"], d["compile"]) == ("fp32", True)


def test_the_measurement_keeps_its_time_limit(monkeypatch):
    built, said = [], []
    monkeypatch.setattr(timing, "_stepper", fake_stepper({"fp32": 0.02, "bf16": 0.018}, built))
    cfg = make("hardware=cpu", "model=tiny")
    seconds = timing.measure_steps(cfg, make_plan(cfg, CPU), SHAPE, EVERY, limit=20, say=said.append)
    # eager ones fit; compiling one is taken to need COMPILE_SECONDS (30 s) until one was timed
    assert built == ["fp32", "bf16"] and seconds["fp32+compile"] == seconds["bf16+compile"] == float("inf")
    assert sum("not timed, compiling it takes ~30 s" in line for line in said) == 2, said
    assert "not timed" in calibrate.describe({**calibrate.decide(seconds, EVERY), "how": "measured"})
    assert timing.time_limit(900) == pytest.approx(45) and timing.time_limit(None) == timing.time_limit(1e5) == 60
