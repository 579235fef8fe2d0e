import os
import time

import pytest
from omegaconf import OmegaConf

from lingmao.config import ConfigError
from lingmao.machine import Gpu, Machine
from lingmao.plan import closest_preset, make_plan, runnable_plan
from test_config import make

LAPTOP = Machine(cores=2, ram_gb=24)
AMX_CPU = Machine(cores=2, ram_gb=24, cpu_flags=frozenset({"amx_bf16", "avx512_bf16"}))
T4S = Machine(cores=16, ram_gb=64, gpus=(Gpu("Tesla T4", 15.6, 7.5),) * 2)
H100 = Machine(cores=16, ram_gb=128, gpus=(Gpu("NVIDIA H100 80GB HBM3", 79.1, 9.0),))
MAC = Machine(cores=8, ram_gb=16, mps=True)

# seed 000 / 004 settings per preset: (device, precision, micro, accumulation, devices)
EXPECTED = {
    "rtx4090": ("cuda", "bf16", 16, 2, 1),
    "rtx3060": ("cuda", "bf16", 8, 4, 1),
    "t4x2": ("cuda", "fp16", 32, 4, 2),
    "m1": ("mps", "fp32", 16, 2, 1),
    "cpu": ("cpu", "fp32", 8, 4, 1),
}


@pytest.mark.parametrize("preset", EXPECTED)
@pytest.mark.parametrize("model", ("small", "medium", "large"))
def test_plan_for_every_preset_on_a_cpu_laptop(preset, model):
    t = time.perf_counter()
    plan = make_plan(make(f"hardware={preset}", f"model={model}"), LAPTOP)
    assert time.perf_counter() - t < 1.0
    device, precision, micro, accum, devices = EXPECTED[preset]
    assert (plan.device, plan.precision, plan.micro_batch, plan.accumulation, plan.world_size) == \
        (device, precision, micro, accum, devices)
    assert plan.effective_batch == micro * accum * devices
    assert plan.grad_scaler == (precision == "fp16")
    assert plan.fused_optimizer == (device in ("cuda", "cpu"))  # MPS: unmeasured, left off
    assert preset in plan.table()


def test_t4_gets_fp16_even_when_bf16_is_asked():
    plan = make_plan(make("hardware=t4x2", "hardware.precision=bf16"), T4S)
    assert plan.precision == "fp16" and plan.grad_scaler
    assert "7.5" in plan.precision_reason
    assert not plan.tf32  # Turing has no TF32


def test_ampere_preset_on_a_real_t4_drops_to_fp16():
    plan = make_plan(make("hardware=rtx4090"), Machine(cores=4, ram_gb=16, gpus=(Gpu("Tesla T4", 15.6, 7.5),)))
    assert plan.precision == "fp16" and not plan.tf32


def test_cpu_precision_follows_native_bf16():
    assert make_plan(make("hardware=cpu"), AMX_CPU).precision == "bf16"
    assert make_plan(make("hardware=cpu"), LAPTOP).precision == "fp32"
    assert make_plan(make("hardware=cpu", "hardware.precision=fp32"), AMX_CPU).precision == "fp32"


@pytest.mark.parametrize("machine, preset", [(LAPTOP, "cpu"), (T4S, "t4x2"), (H100, "rtx4090"), (MAC, "m1"),
                                              (Machine(2, 8, gpus=(Gpu("RTX 3060", 12, 8.6),)), "rtx3060")])
def test_auto_picks_the_closest_preset(machine, preset):
    plan = make_plan(make(), machine)
    assert plan.preset == preset == closest_preset(machine)[0]
    assert "auto" in plan.preset_reason


def test_auto_keeps_what_the_user_set():
    plan = make_plan(make("hardware.batch=3", "hardware.accumulation=5"), LAPTOP)
    assert (plan.preset, plan.micro_batch, plan.accumulation, plan.effective_batch) == ("cpu", 3, 5, 15)


def test_lr_is_scaled_to_the_effective_batch():
    plan = make_plan(make("hardware=t4x2", "optim.lr=5e-5", "optim.lr_scaling=sqrt"), LAPTOP)
    assert plan.effective_batch == 256
    assert plan.lr == pytest.approx(5e-5 * 4)  # sqrt(256 / 16)


def test_missing_device_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="t4x2.*fallback"):
        runnable_plan(make("hardware=t4x2"), LAPTOP)


def test_fallback_runs_on_what_exists():
    plan = runnable_plan(make("hardware=t4x2", "hardware.fallback=true"), LAPTOP)
    assert plan.device == "cpu" and plan.world_size == 1
    assert any("fallback" in n for n in plan.notes)


def test_plan_estimates_memory_and_speed():
    small = make_plan(make("hardware=rtx4090", "model=small"), LAPTOP)
    large = make_plan(make("hardware=rtx4090", "model=large"), LAPTOP)
    assert 0 < small.estimate_gb < large.estimate_gb < small.memory_gb == 24
    assert small.estimate_checkpointed_gb < small.estimate_gb
    assert small.headroom_gb == pytest.approx(24 - small.estimate_gb, abs=0.02)
    assert small.est_tokens_per_sec > large.est_tokens_per_sec > 0
    assert "estimate_gb" in small.table()


def test_fixed_batch_that_does_not_fit_stops_with_a_suggestion():
    cfg = make("hardware=t4x2", "model=large", "hardware.fallback=true")
    plan = make_plan(cfg, T4S)
    assert not plan.fits and "hardware.batch=" in plan.notes[-1]
    with pytest.raises(ConfigError, match=r"needs ~\d+\.\d GB.*hardware\.batch=auto"):
        runnable_plan(cfg, T4S)


def test_batch_auto_fits_and_keeps_the_effective_batch():
    fixed = make_plan(make("hardware=t4x2", "model=large"), T4S)
    auto = make_plan(make("hardware=t4x2", "model=large", "hardware.batch=auto"), T4S)
    assert auto.fits and auto.micro_batch < fixed.micro_batch
    assert auto.effective_batch >= fixed.effective_batch
    assert auto.effective_batch < fixed.effective_batch + 2 * auto.micro_batch  # rounding up at most one step
    # a micro-batch that already fits is kept
    ok = make_plan(make("hardware=rtx4090", "model=small", "hardware.batch=auto"), H100)
    assert (ok.micro_batch, ok.accumulation) == (16, 2)


def test_avx512_bf16_without_amx_stays_fp32():
    plan = make_plan(make("hardware=cpu"), Machine(cores=2, ram_gb=24, cpu_flags=frozenset({"avx512_bf16"})))
    assert plan.precision == "fp32" and "AMX" in plan.precision_reason


def test_cuda_plan_exports_the_presets_allocator_settings_unless_the_user_set_them(monkeypatch):
    from lingmao.runtime import apply_runtime

    plan = make_plan(make("hardware=rtx4090"), H100)
    assert plan.alloc_conf == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    apply_runtime(plan)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    apply_runtime(plan)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_a_launchers_world_size_sets_the_effective_batch_and_lr():
    """torchrun across 2 nodes x 2 T4s: WORLD_SIZE 4, not the preset's 2 devices."""
    one_node = make_plan(make("hardware=t4x2"), T4S)
    two_nodes = make_plan(make("hardware=t4x2"), T4S, world_size=4)
    assert (one_node.world_size, two_nodes.world_size) == (2, 4)
    assert two_nodes.effective_batch == 2 * one_node.effective_batch == 32 * 4 * 4
    assert two_nodes.lr == pytest.approx(one_node.lr * 2 ** 0.5)  # sqrt scaling


def test_run_plans_for_the_world_size_torchrun_set(tmp_path, monkeypatch, capsys):
    from lingmao.run import execute

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    execute(make("hardware=cpu", "model=tiny", "plan=true"), tmp_path, tmp_path / "run")
    table = dict((line.split(None, 1) + [""])[:2] for line in capsys.readouterr().out.splitlines())
    assert table["world_size"] == "3" and table["effective_batch"] == str(3 * 8 * 4)
