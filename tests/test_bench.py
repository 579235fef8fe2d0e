"""lingmao.bench: paired-block statistics, the bare loop against the engine, the CLI."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lingmao.bench.__main__ import main
from lingmao.bench.compose import Composer
from lingmao.bench.cpu import plot_scaling
from lingmao.bench.options import OptionError, parse_args
from lingmao.bench.startup import BARE_PHASES, median_phases, phases
from lingmao.bench.stats import compare, interleave, median_interval
from lingmao.plan.peaks import dense_bf16_tflops

TINY = [
    "hardware=cpu",
    "model=tiny",
    "model.context_length=32",
    "hardware.batch=4",
    "hardware.accumulation=2",
    "hardware.precision=fp32",
    "optim.lr=3e-3",
]


def noisy(rate: float, sd: float, seed: int):
    """A contender whose blocks come in at `rate` with deterministic Gaussian noise."""
    rng = random.Random(seed)
    return lambda: rate * (1 + rng.gauss(0, sd))


# --- stats ---


def test_sign_test_interval_uses_the_right_order_statistics():
    i = median_interval(list(range(1, 31)))
    # n = 30: x_(10) and x_(21) cover the median with 1 - 2 P(Bin(30, 1/2) <= 9) = 95.7%
    assert (i.median, i.low, i.high, i.n) == (15.5, 10, 21, 30)
    assert i.confidence == pytest.approx(0.9572, abs=1e-4)
    few = median_interval([5.0, 1.0, 3.0, 2.0, 4.0])  # below 6 values: [min, max], 1 - 2/32
    assert (few.median, few.low, few.high) == (3.0, 1.0, 5.0)
    assert few.confidence == pytest.approx(0.9375)


def test_interleave_alternates_rounds_and_pairs_adjacent_blocks():
    calls = []

    def contender(name, values):
        it = iter(values)

        def block():
            calls.append(name)
            return next(it)

        return block

    p = interleave(contender("a", [10, 20, 30, 40]), contender("b", [1, 2, 3, 4]), 4)
    assert calls == ["a", "b", "a", "b", "b", "a", "b", "a"]
    assert p.ratios == [10, 10, 10, 10]
    assert p.control == [0.5, 0.5, 0.75, 0.75]  # earlier / later block of one contender in a round


def test_ten_percent_slower_contender_gives_0_9_with_ci_excluding_1():
    c = compare(interleave(noisy(90, 0.02, 1), noisy(100, 0.02, 2), 30))
    assert c.ratio.n == 30 and c.ratio.median == pytest.approx(0.9, abs=0.015)
    assert c.ratio.high < 1.0
    assert c.conclusive
    assert c.describe("engine/bare").startswith("engine/bare = 0.9")


def test_identical_contenders_control_includes_1():
    same = noisy(100, 0.03, 3)
    c = compare(interleave(same, same, 30))
    assert c.control.contains(1.0) and c.ratio.contains(1.0)
    assert c.conclusive


def test_noisy_control_makes_the_comparison_inconclusive():
    # A neighbour's job ramps up: each block runs 5% slower than the one
    # before, plus noise. A real 10% difference is there, yet no ratio is
    # reported: the same-vs-same control shows the machine moving.
    rng, blocks = random.Random(4), [0]

    def contender(rate):
        def block():
            blocks[0] += 1
            return rate * 0.95 ** blocks[0] * (1 + rng.gauss(0, 0.01))

        return block

    c = compare(interleave(contender(90), contender(100), 30))
    assert not c.control.contains(1.0)
    assert not c.conclusive
    text = c.describe("engine/bare")
    assert "inconclusive" in text and f"{c.ratio.median:.3f}" not in text


# --- the bare loop against the engine ---


def cpu_suite(tmp_path, overrides, **opts):
    from lingmao.bench.options import BenchOptions
    from lingmao.bench.suite import Suite, silent_tracker
    from lingmao.plan.machine import detect
    from lingmao.plan.make import runnable_plan

    composer = Composer(overrides)
    cfg, machine = composer.compose(), detect()
    return Suite(
        "cpu", composer, cfg, runnable_plan(cfg, machine), machine, BenchOptions(**opts), silent_tracker(), out=tmp_path
    )


@pytest.mark.slow
def test_engine_overhead_same_losses_then_blocks_alternating_in_one_engine_run(tmp_path, training_cache):
    from lingmao.bench.overhead import engine_overhead

    # dropout on: the bare loop must draw the engine's random masks too
    s = cpu_suite(tmp_path, [*TINY, "model.dropout=0.1"], pairs=2, block_seconds=0.05)
    r = engine_overhead(s)
    # 20 steps, seed 1337: the bare loop computes the engine's losses exactly, and they fall
    assert r["losses_equal"] and r["loss_max_abs_diff"] == 0.0
    assert r["loss_last"] < r["loss_first"]
    assert r["pairs"] == 2 and r["engine_tokens_per_sec"] > 0 and r["bare_tokens_per_sec"] > 0
    # One engine run: a start-up interval, then one log per engine block (order "abab": two of them)
    client = MlflowClient(f"sqlite:///{tmp_path / 'engine' / 'engine_run.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lingmao-bench-engine").experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [r["log_every"] * k for k in (1, 2, 3)]


@pytest.mark.slow
def test_bare_loop_and_bench_steps_compute_the_engines_moe_losses(tmp_path, training_cache):
    from lingmao.bench.loop import Steps
    from lingmao.bench.measure import train_tokens
    from lingmao.bench.overhead import engine_variant, loss_check
    from lingmao.data.windows import TokenWindows

    # Load balancing weighed 100x its default: the losses part from the second step on when it is left out
    s = cpu_suite(tmp_path, [*TINY, "model.moe.experts=2", "model.moe.aux_loss_weight=1.0"])
    engine, bare = loss_check(s, 4, tmp_path / "losses")
    assert len(engine) == 4 and engine == bare
    # What benchmark mode, suite=cpu and suite=speedrun train is the engine's step itself
    cfg, plan = engine_variant(s, **{"trainer.max_steps": 4})
    tokens, vocab, stride, _ = train_tokens(cfg, False, 0, 0)
    steps = Steps(cfg, plan, TokenWindows(tokens, cfg.model.context_length, stride), vocab, total_steps=4)
    assert [steps.step().item() for _ in range(4)] == engine


# --- command line ---


def test_bench_options_are_parsed_apart_from_overrides():
    suite, opts, rest = parse_args(
        ["suite=cpu", "bench.pairs=4", "bench.synthetic=true", "model=tiny", "bench.engine_model=small"]
    )
    assert (suite, opts.pairs, opts.synthetic, opts.engine_model, rest) == ("cpu", 4, True, "small", ["model=tiny"])
    with pytest.raises(OptionError, match="bench.stepz is not a benchmark key; valid keys: bench.steps"):
        parse_args(["bench.stepz=3"])
    with pytest.raises(OptionError, match="must be > 0"):
        parse_args(["bench.block_seconds=0"])


def test_bench_keys_are_typed_and_bad_ones_named_in_one_line():
    suite, opts, rest = parse_args(["suite=speedrun", "bench.target=2.5", "bench.out=", "bench.warmup=0", "x=1"])
    assert (suite, opts.target, opts.out, opts.warmup, rest) == ("speedrun", 2.5, None, 0, ["x=1"])
    for arg, message in (
        ("bench.steps=ten", "bench.steps: Value 'ten' of type 'str' could not be converted to Integer"),
        ("bench.synthetic=maybe", "bench.synthetic: Value 'maybe' is not a valid bool"),
        ("suite=tpu", "suite: Invalid value 'tpu', expected one of [cpu, gpu, speedrun]"),
        ("bench.target=-1", r"bench.target=-1.0 must be >= 0"),
    ):
        with pytest.raises(OptionError) as e:
            parse_args([arg])
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_variant_values_win_over_the_users_and_keep_their_types():
    c = Composer(["hardware=cpu", "model=tiny", "model.context_length=128", "trainer.max_epochs=3"])
    cfg = c.compose(
        {}, {"model.context_length": 64, "trainer.max_epochs": None, "resume": "never", "hardware.compile": True}
    )
    assert (cfg.model.context_length, cfg.trainer.max_epochs, cfg.resume, cfg.hardware.compile) == (
        64,
        None,
        "never",
        True,
    )
    assert c.compose().model.context_length == 128  # the user's command line itself is left alone


def test_median_interval_with_ties_has_the_coverage_of_its_order_statistics():
    i = median_interval([1.0] * 12 + [2.0] * 18)  # n = 30 again: x_(10) and x_(21), now both ties
    assert (i.low, i.high) == (1.0, 2.0) and i.confidence == pytest.approx(0.9572, abs=1e-4)


def test_variant_replaces_the_users_group_choice_but_keeps_their_values():
    c = Composer(["hardware=cpu", "model=medium", "model.dropout=0.2"])
    cfg = c.compose({"model": "tiny"}, {"model.context_length": 64})
    assert (cfg.model.name, cfg.model.d_model, cfg.model.dropout, cfg.model.context_length) == ("tiny", 128, 0.2, 64)


def test_gpu_suite_refuses_clearly_without_cuda(capsys):
    assert main(["suite=gpu", "hardware=cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: suite=gpu measures a CUDA GPU" in err and "suite=cpu" in err


def test_user_errors_are_one_line_and_start_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["hardware=cpu", "model=huge"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["suite=cpu", "hardware=cpu", "bench.parts=engine,speed"]) == 2
    assert "bench.parts='engine,speed': choose 'all' or some of engine, data, startup" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_startup_phases_are_spans_between_marks():
    marks = {"launch": 10.0, "probe": 10.05, "imports": 11.0, "data": 11.1, "model": 11.3, "step": 12.0}
    spans = phases(marks, BARE_PHASES)
    assert [k for k, _, _ in spans] == ["probe", "imports", "data", "model", "step"]
    assert [s for _, _, s in spans] == pytest.approx([0.05, 0.95, 0.1, 0.2, 0.7])
    later = {k: v + 0.5 * (k != "launch") for k, v in marks.items()}  # a second launch, 0.5 s slower to start
    medians = median_phases([marks, later, later], BARE_PHASES)
    assert [s for _, _, s in medians] == pytest.approx([0.55, 0.95, 0.1, 0.2, 0.7])
    del marks["data"]  # a function the probe no longer finds: its span joins the next
    spans = phases(marks, BARE_PHASES)
    assert [k for k, _, _ in spans] == ["probe", "imports", "model", "step"]
    assert spans[2][1] == "map the token file, first batch + model build, optimizer"
    assert spans[2][2] == pytest.approx(0.3)


def test_scaling_plot_is_written(tmp_path):
    rows = [
        {
            "model": m,
            "params": p,
            "context_length": c,
            "tokens_per_sec": t,
            "training_memory_gb": g,
            "precision": "bf16",
            "memory": "peak RSS",
        }
        for m, p, t, g in (("tiny", 2e6, 9000, 0.5), ("small", 3e7, 900, 1.0))
        for c in (128, 512)
    ]
    path = plot_scaling(rows, tmp_path / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_bf16_peaks_by_device_name():
    assert dense_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert dense_bf16_tflops("NVIDIA L40S") == 362.0 and dense_bf16_tflops("NVIDIA L4") == 121.0
    assert dense_bf16_tflops("Tesla T4") is None  # no bf16 tensor cores: the preset's fp16 peak applies


@pytest.mark.slow
def test_benchmark_mode_prints_and_logs_to_mlflow(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lingmao.bench",
            *TINY,
            "bench.steps=3",
            "bench.warmup=1",
            "bench.synthetic=true",
            "trainer.log_every=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in (
        "samples/sec",
        "tokens/sec",
        "MFU",
        "fp32 matmul measured here",
        "data wait",
        "forward+backward",
        "optimizer",
        "logging",
        "peak memory",
    ):
        assert text in proc.stdout, text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lingmao-bench").experiment_id])
    assert run.data.metrics["bench/samples_per_sec"] > 0 and run.data.metrics["bench/mfu"] > 0
    assert run.data.params["config.model.context_length"] == "32"
    assert len(client.get_metric_history(run.info.run_id, "bench/loss")) == 3


# --- suite=speedrun ---


def test_speedrun_contenders_are_chosen_by_name_baseline_first():
    from dataclasses import fields

    from lingmao.bench.options import BenchOptions
    from lingmao.bench.speedrun import CONTENDERS, chosen

    assert chosen("all") == list(CONTENDERS) and list(CONTENDERS)[0] == "baseline"
    assert chosen("combined, muon") == ["baseline", "muon", "combined"]  # CONTENDERS order, baseline added
    assert chosen("baseline") == ["baseline"]
    with pytest.raises(
        OptionError,
        match=r"bench.contenders='muon,rotory': unknown rotory; choose 'all' or some "
        r"of baseline, muon, rotary, qk_norm, relu2, vocab64, zero_init_proj",
    ):
        chosen("muon,rotory")
    with pytest.raises(OptionError, match="empty"):
        chosen(" , ")
    help_text = next(f.metadata["help"] for f in fields(BenchOptions) if f.name == "contenders")
    assert ",".join(CONTENDERS) in help_text  # the help names every contender there is


def test_speedrun_refuses_a_bad_contender_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["suite=speedrun", "hardware=cpu", "model=tiny", "bench.contenders=muon,adam"]) == 2
    err = capsys.readouterr().err
    assert "error: bench.contenders='muon,adam': unknown adam; choose 'all' or some of baseline, muon" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


class ScriptedLoop:
    """Stands in for loop.Steps in race(): training losses by step, nothing trained."""

    def __init__(self, losses):
        self.steps, self.losses = 0, losses
        self.raw = self.plan = self.device = None

    def step(self):
        import torch

        self.steps += 1
        return torch.tensor(self.losses.get(self.steps, 1.0))


def scripted_race(monkeypatch, val_by_step, target, losses=None, max_steps=10, eval_every=3):
    from lingmao.bench.speedrun import Contender, race
    from lingmao.bench.suite import silent_tracker
    from lingmao.train import validation

    loop = ScriptedLoop(losses or {})
    monkeypatch.setattr(
        validation, "evaluate", lambda model, batches, plan, device, n, dist, nw: val_by_step[loop.steps]
    )
    return race(Contender("x", "", 1), loop, [], 1, max_steps, eval_every, target, silent_tracker())


def test_speedrun_race_evaluates_on_schedule_and_stops_at_the_target(monkeypatch):
    vals = {0: 9.0, 3: 8.0, 6: 7.0, 9: 6.5, 10: 6.4}
    c = scripted_race(monkeypatch, vals, target=None)  # the baseline's full budget: evals at 0, every 3, the end
    assert [(e.step, e.val_loss) for e in c.evals] == [(s, vals[s]) for s in (0, 3, 6, 9, 10)]
    assert c.stopped == "budget" and len(c.step_seconds) == 10
    assert [e.seconds for e in c.evals] == sorted(e.seconds for e in c.evals) and c.evals[0].seconds == 0.0
    assert c.evals[-1].seconds == pytest.approx(c.train_seconds)
    c = scripted_race(monkeypatch, vals, target=7.0)  # reached at step 6: no step after it
    assert [e.step for e in c.evals] == [0, 3, 6] and c.stopped == "target" and len(c.step_seconds) == 6
    c = scripted_race(monkeypatch, vals, target=7.0, losses={5: float("nan")})
    assert c.stopped == "diverged" and len(c.step_seconds) == 5 and [e.step for e in c.evals] == [0, 3]


def test_speedrun_summary_ratios_and_not_reached():
    from lingmao.bench.speedrun import Contender, Eval, summarise, table

    def contender(name, history, steps):
        return Contender(name, "", 2_000_000, [Eval(*h) for h in history], [0.5] * steps)

    base = contender("baseline", [(0, 0.0, 9.0), (4, 2.0, 8.0), (8, 4.0, 7.5)], 8)
    fast = contender("muon", [(0, 0.0, 9.0), (4, 1.5, 7.4)], 4)
    slow = contender("rotary", [(0, 0.0, 9.0), (4, 2.5, 7.9), (8, 5.0, 7.6)], 8)
    rows = summarise([base, fast, slow], 7.5)
    assert [r["ratio_seconds"] for r in rows] == [1.0, 0.375, None]
    assert [r["ratio_steps"] for r in rows] == [1.0, 0.5, None]
    assert (rows[1]["steps_to_target"], rows[1]["seconds_to_target"]) == (4, 1.5)
    assert rows[2]["reached"] is False and (rows[2]["best_val_loss"], rows[2]["best_step"]) == (7.6, 8)
    text = "\n".join(table(rows, 7.5, given=True))
    assert "not reached (best 7.6000 at step 8)" in text and "0.375" in text
    # A target the baseline never reaches leaves no ratio for anyone.
    assert all(r["ratio_seconds"] is None for r in summarise([base, fast], 7.45))


@pytest.fixture
def restore_threads():
    """main() sets torch's thread count from the plan; give it back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_speedrun_suite_runs_two_contenders_and_logs_them(
    tmp_path, monkeypatch, shared_cache, mlflow_db, capsys, restore_threads
):
    import json

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "suite=speedrun",
                *TINY,
                "hardware.threads=1",
                "bench.contenders=muon",
                "bench.max_steps=6",
                "bench.eval_every=2",
                "bench.eval_windows=4",
                f"bench.out={out}",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "target: the baseline's final val loss" in text
    assert (
        "reproduce: python -m lingmao.bench suite=speedrun bench.max_steps=6 bench.eval_every=2 "
        "bench.eval_windows=4 bench.contenders=baseline,muon hardware=cpu model=tiny"
    ) in text
    r = json.loads((out / "results.json").read_text())["speedrun"]
    rows = r["contenders"]
    assert list(rows) == ["baseline", "muon"]
    assert [line.split()[0] for line in text.splitlines() if line.startswith(("baseline ", "muon "))][-2:] == [
        "baseline",
        "muon",
    ]  # the table's rows
    base = rows["baseline"]
    assert base["stopped"] == "budget" and base["last_step"] == 6 and r["target"] == base["last_val_loss"]
    assert base["ratio_seconds"] == 1.0 and base["ratio_steps"] == 1.0
    for row in rows.values():
        history = row["history"]
        assert [h[0] for h in history] == [0, 2, 4, 6][: len(history)]
        assert [h[1] for h in history] == sorted(h[1] for h in history) and history[0][1] == 0.0
        hit = next(h for h in history if h[2] <= r["target"]) if row["reached"] else None
        assert row["reached"] == any(h[2] <= r["target"] for h in history)
        if hit:
            assert (row["steps_to_target"], row["seconds_to_target"]) == (hit[0], hit[1])
            assert row["ratio_steps"] == hit[0] / base["steps_to_target"]
            assert row["ratio_seconds"] == pytest.approx(hit[1] / base["seconds_to_target"])
        if row["stopped"] == "target":  # stopped at its first eval at or below the target
            assert history[-1] == hit and row["steps"] == hit[0]
    assert (out / "speedrun.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    (run,) = client.search_runs([client.get_experiment_by_name("lingmao-bench").experiment_id])
    assert run.data.metrics["speedrun/contenders/baseline/ratio_seconds"] == 1.0
    logged = client.get_metric_history(run.info.run_id, "speedrun/muon/val_loss")
    assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == [
        (h[0], pytest.approx(h[2])) for h in rows["muon"]["history"]
    ]
