"""CPU precision/compile by measurement: the decision rule, the cache, and
one real (small) measurement."""

import pytest

from lingmao import calibrate

SHAPE = {"d_model": 32, "n_heads": 2, "n_layers": 1, "context_length": 16, "vocab_size": 50, "micro_batch": 2}


def test_the_fastest_wins_only_beyond_the_noise_margin():
    s = {"fp32": 1.0, "bf16": 0.97, "fp32+compile": 0.99, "bf16+compile": 0.96}
    assert calibrate.decide(s, list(calibrate.CANDIDATES))["precision"] == "fp32"  # 4% faster: noise
    s["bf16+compile"] = 0.5
    d = calibrate.decide(s, list(calibrate.CANDIDATES))
    assert (d["precision"], d["compile"], d["speedup"]) == ("bf16", True, pytest.approx(2.0))
    # the user fixed compile off: the compiled candidates are out
    d = calibrate.decide({**s, "bf16": 0.8}, [("fp32", False), ("bf16", False)])
    assert (d["precision"], d["compile"]) == ("bf16", False)


def test_measured_once_per_cpu_torch_and_shape_then_cached(tmp_path):
    calls = []

    def fake_measure(shape, candidates):
        calls.append(list(candidates))
        return {calibrate.name(p, c): (0.5 if p == "bf16" else 1.0) for p, c in candidates}

    first = calibrate.choose(SHAPE, "auto", "auto", tmp_path, fake_measure)
    again = calibrate.choose(SHAPE, "auto", "auto", tmp_path, fake_measure)
    assert len(calls) == 1 and len(calls[0]) == 4
    assert first["precision"] == again["precision"] == "bf16"
    calibrate.choose({**SHAPE, "micro_batch": 4}, "auto", False, tmp_path, fake_measure)  # another shape
    assert len(calls) == 2 and all(not c for _, c in calls[1])  # compile fixed off: not measured


def test_a_real_measurement_times_each_candidate(tmp_path):
    seconds = calibrate.measure(SHAPE, [("fp32", False), ("bf16", False)], rounds=2)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < v < 10 for v in seconds.values())
