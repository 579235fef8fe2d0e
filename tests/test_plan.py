import os
import re
import time

import pytest
from test_config import make

from lingmao.config import ConfigError
from lingmao.config.presets import HARDWARE as PRESETS
from lingmao.config.presets import hardware_preset as load_preset
from lingmao.plan import exit_status
from lingmao.plan.estimate import model_shape
from lingmao.plan.machine import Gpu, Machine, detect
from lingmao.plan.make import make_plan, runnable_plan
from lingmao.plan.memory import GiB, estimate_memory
from lingmao.plan.presets import closest_preset
from lingmao.plan.summary import render

LAPTOP = Machine(cores=2, ram_gb=24)
T4 = Gpu("Tesla T4", 14.7, 7.5)
T4S = Machine(cores=16, ram_gb=64, gpus=(Gpu("Tesla T4", 15.6, 7.5),) * 2)
H100 = Machine(cores=16, ram_gb=128, gpus=(Gpu("NVIDIA H100 80GB HBM3", 79.1, 9.0),))
MAC = Machine(cores=8, ram_gb=16, mps=True)

# per preset: (device, precision on LAPTOP, seed micro-batch, accumulation, devices): the seed settings
EXPECTED = {
    "datacenter": ("cuda", "bf16", 256, 1, 1),
    "rtx4090": ("cuda", "bf16", 16, 2, 1),
    "rtx3060": ("cuda", "bf16", 8, 4, 1),
    "t4x2": ("cuda", "fp16", 32, 4, 2),
    "t4": ("cuda", "fp16", 32, 8, 1),
    "m1": ("mps", "fp32", 16, 2, 1),
    "cpu": ("cpu", "fp32", 8, 1, 1),
}
SIZES = ("small", "medium", "large")


def test_every_preset_has_a_test_row():
    assert set(EXPECTED) == set(PRESETS)


def alternative_overrides(refusal: str) -> list[list[str]]:
    """The overrides a refusal names as fitting, e.g. model.context_length=256 or model=small."""
    found = re.findall(
        r"(model\.context_length=\d+|model=\w+|hardware\.batch=\d+ hardware\.accumulation=\d+"
        r"(?: hardware\.activation_checkpointing=true)?)",
        refusal,
    )
    return [f.split() for f in found]


def check_target_plan(plan, preset: str, preferred: int, cfg_overrides: list[str], machine: Machine):
    """The plan fits with the preset's exact effective batch, or is refused
    naming an alternative that does fit."""
    target = load_preset(preset)["effective_batch"]
    if not plan.fits:
        alts = alternative_overrides(plan.refusal)
        assert alts, plan.refusal
        for alt in alts:
            assert make_plan(make(*cfg_overrides, *alt), machine).fits, alt
        return
    assert plan.micro_batch * plan.accumulation * plan.world_size == plan.effective_batch == target
    assert plan.micro_batch <= preferred
    assert plan.estimate_gb * (1 + plan.estimate_margin) <= plan.memory_gb + 0.01
    # the largest: the next larger divisor of the per-device batch (up to the preferred one) does not fit
    per = target // plan.world_size
    larger = [m for m in range(plan.micro_batch + 1, min(preferred, per) + 1) if per % m == 0]
    shape = model_shape(
        make(*cfg_overrides).model,
        vocab=plan.vocab_assumed,
        precision=plan.precision,
        device=plan.device,
        ddp=plan.world_size > 1,
    )
    for m in larger[:1]:
        need = estimate_memory(micro_batch=m, activation_checkpointing=plan.activation_checkpointing, **shape)
        assert need.gb() * (1 + plan.estimate_margin) > plan.memory_gb


@pytest.mark.parametrize("preset", EXPECTED)
@pytest.mark.parametrize("model", SIZES)
def test_plan_for_every_preset_on_a_cpu_laptop(preset, model):
    overrides = [f"hardware={preset}", f"model={model}"]
    cfg = make(*overrides)
    t = time.process_time()  # CPU time: other processes on the shared cores do not count
    plan = make_plan(cfg, LAPTOP)
    assert time.process_time() - t < 1.0
    device, precision, micro, accum, devices = EXPECTED[preset]
    assert (plan.device, plan.precision, plan.world_size) == (device, precision, devices)
    # The preset's seed split is its effective batch; a size that needs a smaller
    # micro-batch keeps that effective batch (it used to keep the micro-batch and not fit).
    assert plan.target_effective_batch == micro * accum * devices
    check_target_plan(plan, preset, micro, overrides, LAPTOP)
    if model == "small" and preset not in ("m1",):
        assert (plan.micro_batch, plan.accumulation) == (micro, accum)
    assert plan.grad_scaler == (precision == "fp16")
    assert plan.fused_optimizer == (device in ("cuda", "cpu"))  # MPS: unmeasured, left off
    assert f"hardware={preset}" in render(plan)


@pytest.mark.parametrize("model", SIZES)
def test_auto_on_this_machine_fits_its_target(model):
    machine = detect()
    plan = make_plan(make(f"model={model}"), machine)
    check_target_plan(plan, plan.preset, load_preset(plan.preset)["batch"], [f"model={model}"], machine)


def test_the_users_t4x2_medium_fits_two_real_t4s():
    plan = runnable_plan(make("hardware=t4x2", "model=medium"), T4S)
    assert plan.fits and plan.effective_batch == 256 and plan.world_size == 2
    assert plan.micro_batch < 32  # 32 does not fit in 16 GB
    assert any("divides the per-device batch 128" in n for n in plan.notes)


def test_t4_gets_fp16_even_when_bf16_is_asked():
    plan = make_plan(make("hardware=t4x2", "hardware.precision=bf16"), T4S)
    assert plan.precision == "fp16" and plan.grad_scaler
    assert "7.5" in plan.precision_reason
    assert not plan.tf32  # Turing has no TF32


def test_fp16_asked_on_ampere_says_so_not_that_the_capability_is_low():
    plan = make_plan(make("hardware=rtx4090", "hardware.precision=fp16"), LAPTOP)
    assert plan.precision == "fp16" and "asked for fp16" in plan.precision_reason
    assert "< 8.0" not in plan.precision_reason


def test_ampere_preset_on_a_real_t4_drops_to_fp16():
    plan = make_plan(make("hardware=rtx4090"), Machine(cores=4, ram_gb=16, gpus=(T4,)))
    assert plan.precision == "fp16" and not plan.tf32


@pytest.mark.parametrize(
    "machine, preset",
    [
        (LAPTOP, "cpu"),
        (T4S, "t4x2"),
        (H100, "datacenter"),
        (Machine(4, 64, gpus=(Gpu("NVIDIA A100-PCIE-40GB", 39.4, 8.0),)), "rtx4090"),  # under 40 GB
        (MAC, "m1"),
        (Machine(2, 8, gpus=(Gpu("RTX 3060", 12, 8.6),)), "rtx3060"),
        (Machine(2, 12, gpus=(T4,)), "t4"),
    ],
)
def test_auto_picks_the_closest_preset(machine, preset):
    plan = make_plan(make(), machine)
    assert plan.preset == preset == closest_preset(machine)[0]
    assert "auto" in plan.preset_reason


def test_auto_on_one_t4_runs_one_process_not_a_missing_cuda_1():
    plan = runnable_plan(make(), Machine(cores=2, ram_gb=12, gpus=(T4,)))
    assert (plan.preset, plan.devices, plan.world_size) == ("t4", 1, 1)
    assert plan.effective_batch == 256 and plan.device_name == "Tesla T4"


def test_auto_uses_the_detected_gpu_count_memory_and_peak():
    a100s = Machine(cores=32, ram_gb=256, gpus=(Gpu("NVIDIA A100-SXM4-80GB", 79.2, 8.0),) * 4)
    plan = runnable_plan(make("model=medium"), a100s)
    assert (plan.preset, plan.world_size, plan.memory_gb) == ("datacenter", 4, 79.2)
    assert plan.effective_batch == 256 and (plan.micro_batch, plan.accumulation) == (64, 1)
    assert plan.peak_tflops_per_device == 312.0 and "A100" in plan.peak_source


def test_peak_is_per_device_and_by_precision():
    assert make_plan(make("hardware=t4x2"), T4S).peak_tflops_per_device == 65.0  # not 2 x 65
    assert make_plan(make(), H100).peak_tflops_per_device == 989.4  # not the 4090 preset's 165
    tf32 = make_plan(make("hardware.precision=fp32"), Machine(4, 64, gpus=(Gpu("NVIDIA A100-PCIE-40GB", 39.4, 8.0),)))
    assert tf32.tf32 and tf32.peak_tflops_per_device == 156.0


def test_unknown_gpu_has_no_peak_and_says_the_engine_measures():
    plan = make_plan(make(), Machine(4, 64, gpus=(Gpu("NVIDIA B300 Future", 180.0, 10.0),)))
    assert plan.peak_tflops_per_device is None
    assert "measures" in plan.peak_source and plan.est_step_seconds is None
    assert "measures" in render(plan)


def test_auto_keeps_what_the_user_set():
    plan = make_plan(make("hardware.batch=3", "hardware.accumulation=5"), LAPTOP)
    assert (plan.preset, plan.micro_batch, plan.accumulation, plan.effective_batch) == ("cpu", 3, 5, 15)
    assert any("15, not the cpu preset's effective batch 8" in w for w in plan.warnings)


def test_a_split_that_keeps_the_effective_batch_gives_no_warning():
    plan = make_plan(make("hardware=rtx4090", "hardware.batch=4", "hardware.accumulation=8"), LAPTOP)
    assert (plan.micro_batch, plan.accumulation, plan.effective_batch) == (4, 8, 32)
    assert not plan.warnings
    other = make_plan(make("hardware=rtx4090", "hardware.effective_batch=64"), LAPTOP)
    assert other.effective_batch == 64 and any("not the rtx4090 preset's 32" in w for w in other.warnings)


@pytest.mark.parametrize("hardware", ["cpu", "rtx4090", "t4x2"])
def test_the_quick_start_runs_at_the_presets_own_batch_without_a_warning(hardware):
    plan = make_plan(make("experiment=quickstart", f"hardware={hardware}"), T4S)
    assert plan.effective_batch == plan.target_effective_batch and not plan.warnings, plan.warnings


def test_lr_is_scaled_to_the_effective_batch():
    plan = make_plan(make("hardware=t4x2", "optim.lr=5e-5", "optim.lr_scaling=sqrt", "optim.base_batch=16"), LAPTOP)
    assert plan.effective_batch == 256
    assert plan.lr == pytest.approx(5e-5 * 4)  # sqrt(256 / 16)


def test_by_default_each_model_size_trains_at_its_own_lr():
    lrs = {size: make_plan(make("hardware=cpu", f"model={size}"), LAPTOP) for size in ("tiny", "small", "large")}
    assert lrs["tiny"].lr > lrs["small"].lr > lrs["large"].lr
    assert lrs["small"].lr_source == "optim.lr_by_size.small"
    assert make_plan(make("hardware=cpu", "model=small", "optim.lr=1e-4"), LAPTOP).lr_source == "optim.lr"
    swapped = make_plan(make("hardware=cpu", "model=small", "optim=muon"), LAPTOP)  # muon's AdamW part too
    assert swapped.lr == lrs["small"].lr


def test_the_plan_names_muons_own_lr_beside_adamws():
    from lingmao.plan.summary import lr_rule

    muon = make_plan(make("hardware=t4x2", "optim=muon", "optim.muon_lr=0.03", "optim.lr_scaling=sqrt"), LAPTOP)
    assert muon.muon_lr == 0.03  # not batch-scaled, unlike AdamW's part
    assert lr_rule(muon).startswith("Muon 3e-2 (optim.muon_lr) for the blocks' matrices, AdamW ")
    assert "sqrt(" in lr_rule(muon) and "Muon" not in lr_rule(make_plan(make("hardware=t4x2", "optim=adamw"), LAPTOP))


def test_missing_device_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="t4x2.*fallback"):
        runnable_plan(make("hardware=t4x2"), LAPTOP)


def test_fallback_runs_on_what_exists():
    plan = runnable_plan(make("hardware=t4x2", "hardware.fallback=true"), LAPTOP)
    assert plan.device == "cpu" and plan.world_size == 1
    assert any("fallback" in w for w in plan.warnings)


def shape_of(plan):
    cfg = make(f"hardware={plan.preset}", f"model={plan.model}")
    return model_shape(cfg.model, vocab=plan.vocab_assumed, precision=plan.precision, device=plan.device, ddp=False)


def test_plan_estimates_memory_and_speed():
    small = make_plan(make("hardware=rtx4090", "model=small"), LAPTOP)
    large = make_plan(make("hardware=rtx4090", "model=large"), LAPTOP)
    assert 0 < small.estimate_gb < large.estimate_gb < small.memory_gb == 24
    assert small.estimate_checkpointed_gb is None  # fits without: checkpointing is not shown
    assert small.headroom_gb == pytest.approx(24 - small.estimate_gb, abs=0.02)
    assert small.est_tokens_per_sec > large.est_tokens_per_sec > 0
    assert small.est_run_seconds == pytest.approx(small.est_step_seconds * 1000, rel=1e-3)  # trainer.max_steps
    assert sum(small.estimate_parts_gb.values()) == pytest.approx(small.estimate_gb, abs=0.02)
    # the loss takes LOSS_CHUNK tokens of logits at a time: of the 13.5k vocabulary's logits,
    # a fifth of the memory with the whole micro-batch's at once, little is left
    assert small.loss_chunk and small.estimate_parts_gb["logits"] < 0.1 * small.estimate_gb
    whole = estimate_memory(micro_batch=small.micro_batch, **{**shape_of(small), "loss_chunk": 0})
    assert whole.logits > 0.2 * whole.total


def test_fixed_batch_that_does_not_fit_stops_with_a_suggestion_of_the_same_effective_batch():
    """It used to suggest 23 x 6 (138) for 32 x 4 (128)."""
    cfg = make("hardware=t4x2", "model=large", "hardware.batch=64", "hardware.accumulation=2", "hardware.fallback=true")
    plan = make_plan(cfg, T4S)
    assert not plan.fits and "hardware.batch=" in plan.refusal
    with pytest.raises(ConfigError, match=r"needs ~\d+\.\d GB.*hardware\.batch=auto"):
        runnable_plan(cfg, T4S)
    m, a = map(int, re.search(r"hardware\.batch=(\d+) hardware\.accumulation=(\d+)", plan.refusal).groups())
    assert m * a == 64 * 2
    fixed = make_plan(make("hardware=t4x2", "model=large", f"hardware.batch={m}", f"hardware.accumulation={a}"), T4S)
    assert fixed.fits and fixed.effective_batch == 256


@pytest.mark.parametrize(
    "preset, model, machine", [("rtx3060", "large", LAPTOP), ("cpu", "medium", Machine(2, 6)), ("t4x2", "large", T4S)]
)
def test_every_suggested_split_keeps_the_effective_batch(preset, model, machine):
    overrides = [f"hardware={preset}", f"model={model}", "hardware.batch=64", "hardware.accumulation=2"]
    plan = make_plan(make(*overrides), machine)
    assert not plan.fits and alternative_overrides(plan.refusal)
    for alt in alternative_overrides(plan.refusal):
        fixed = make_plan(make(*overrides[:2], *alt), machine)
        assert fixed.fits and fixed.effective_batch == plan.effective_batch


def test_batch_auto_fits_and_keeps_the_effective_batch():
    fixed = make_plan(make("hardware=t4x2", "model=large", "hardware.batch=64", "hardware.accumulation=2"), T4S)
    auto = make_plan(make("hardware=t4x2", "model=large", "hardware.batch=auto"), T4S)
    assert auto.fits and auto.micro_batch < fixed.micro_batch
    assert auto.effective_batch == fixed.effective_batch == 256  # exactly, not rounded up
    ignored = make_plan(make("hardware=t4x2", "model=large", "hardware.batch=auto", "hardware.accumulation=3"), T4S)
    assert ignored.effective_batch == 256 and any("accumulation=3 is ignored" in w for w in ignored.warnings)
    # a micro-batch that already fits is kept
    ok = make_plan(make("hardware=rtx4090", "model=small", "hardware.batch=auto"), H100)
    assert (ok.micro_batch, ok.accumulation) == (16, 2)


def test_checkpointing_is_chosen_when_it_is_what_makes_a_size_fit():
    cfg = make("hardware=t4", "model=large", "model.context_length=16384")
    machine = Machine(cores=2, ram_gb=12, gpus=(T4,))
    plan = make_plan(cfg, machine)
    assert plan.fits and plan.activation_checkpointing and plan.effective_batch == 256
    assert any("activation checkpointing on" in n for n in plan.notes)
    assert plan.estimate_checkpointed_gb == plan.estimate_gb
    plain = estimate_memory(
        d_model=1024,
        n_heads=16,
        n_layers=16,
        context_length=16384,
        vocab_size=plan.vocab_assumed,
        micro_batch=1,
        precision="fp16",
        dropout=0.1,
        rotary=True,
        vocab_multiple=64,
        loss_chunk=plan.loss_chunk,
    )
    assert plain.total * 1.3 > T4.memory_gb * GiB  # without it, not even micro-batch 1
    forced = make_plan(make("hardware=rtx4090", "model=small", "hardware.activation_checkpointing=true"), LAPTOP)
    assert forced.activation_checkpointing
    assert forced.estimate_gb < make_plan(make("hardware=rtx4090", "model=small"), LAPTOP).estimate_gb


def test_a_size_that_cannot_fit_is_refused_with_what_would():
    overrides = ["hardware=t4", "model=large", "model.context_length=131072"]
    machine = Machine(cores=2, ram_gb=12, gpus=(T4,))
    plan = make_plan(make(*overrides), machine)
    assert not plan.fits and exit_status(plan) != 0
    assert render(plan).startswith("DOES NOT FIT")
    assert "model.context_length=" in plan.refusal and "model=medium (context 768," in plan.refusal
    for alt in alternative_overrides(plan.refusal):
        keep = overrides if alt[0].startswith("model.") else overrides[:2]  # a size comes with its own context
        assert make_plan(make(*keep, *alt), machine).fits, alt
    with pytest.raises(ConfigError, match="even micro-batch 1"):
        runnable_plan(make(*overrides), machine)
    assert exit_status(make_plan(make("hardware=t4", "model=small"), machine)) == 0


def test_table_reads_as_a_decision():
    plan = make_plan(
        make("hardware=rtx4090", "model=small", "optim.lr=5e-5", "optim.lr_scaling=sqrt", "optim.base_batch=16"), LAPTOP
    )
    text = render(plan)
    assert text.splitlines()[0].startswith("FITS  hardware=rtx4090 model=small")
    assert "5e-5 (optim.lr) x sqrt(32/16) = 7.1e-5" in text
    assert f"{plan.params / 1e6:.1f}M parameters" in text
    assert "per step" in text and "the run" in text
    assert "threads" not in text  # this machine's cores say nothing about a 4090
    assert "threads" in render(make_plan(make("hardware=cpu", "model=small"), LAPTOP))


def test_moe_parameters_are_counted():
    plan = make_plan(make("experiment=minimind_t4x2"), T4S)
    # 4 experts x 8 layers: the real model's count (tests/test_estimate.py), with the
    # vocabulary padded to 13,568 rows (5 x d_model 512 more than unpadded)
    assert plan.params == 82_573_824 + 5 * 512
    assert plan.fits and plan.effective_batch == 256


def test_cuda_plan_exports_the_presets_allocator_settings_unless_the_user_set_them(monkeypatch):
    from lingmao.train.backend import apply_runtime

    plan = make_plan(make("hardware=rtx4090"), H100)
    assert plan.alloc_conf == "max_split_size_mb:128"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # undone at teardown: what apply_runtime sets does not leak
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    apply_runtime(plan)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    apply_runtime(plan)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_a_launchers_world_size_keeps_the_effective_batch():
    """torchrun across 2 nodes x 2 T4s: WORLD_SIZE 4, not the preset's 2 devices.
    The effective batch stays the preset's target (it used to double), so the
    LR and the data per step are those of the one-node run."""
    one_node = make_plan(make("hardware=t4x2"), T4S)
    two_nodes = make_plan(make("hardware=t4x2"), T4S, world_size=4)
    assert (one_node.world_size, two_nodes.world_size) == (2, 4)
    assert two_nodes.effective_batch == one_node.effective_batch == 256
    assert two_nodes.micro_batch * two_nodes.accumulation == 64
    assert two_nodes.lr == one_node.lr


def test_a_world_that_does_not_divide_the_target_comes_close_and_warns():
    plan = make_plan(make("hardware=cpu", "model=tiny", "hardware.effective_batch=32"), LAPTOP, world_size=3)
    assert plan.effective_batch != 32 and abs(plan.effective_batch - 32) <= 3
    assert any("do not divide" in w for w in plan.warnings)


def test_run_plans_for_the_world_size_torchrun_set(tmp_path, monkeypatch, capsys):
    from lingmao.run import execute

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    execute(make("hardware=cpu", "model=tiny", "hardware.effective_batch=32", "plan=true"), tmp_path, tmp_path / "run")
    out = capsys.readouterr().out
    assert "micro-batch 8 x accumulation 1 x 4 device(s) = 32" in out  # 8 per process


def test_the_memory_estimate_is_the_planned_optimizers():
    """Muon keeps one momentum buffer for the blocks' matrices, AdamW two moments for every parameter."""
    muon = make_plan(make("hardware=rtx4090", "model=medium", "optim=muon"), LAPTOP)
    adamw = make_plan(make("hardware=rtx4090", "model=medium", "optim=adamw"), LAPTOP)
    assert adamw.estimate_parts_gb["optimizer"] == pytest.approx(8 * adamw.params / GiB, abs=1e-3)
    shape = {**shape_of(muon), "optimizer": "muon"}
    assert muon.estimate_gb == round(estimate_memory(micro_batch=muon.micro_batch, **shape).gb(), 2)
    assert muon.estimate_parts_gb["optimizer"] < 0.6 * adamw.estimate_parts_gb["optimizer"]


def test_the_plan_says_what_each_parameter_group_is_trained_by():
    """~80-90% of the parameters go through Muon: the plan must not read as if AdamW trained them all."""
    t4 = make_plan(make("hardware=auto", "model=small"), Machine(cores=2, ram_gb=12, gpus=(T4,)))
    line = next(s for s in render(t4).splitlines() if s.strip().startswith("optimizer"))
    share = t4.muon_params / t4.params
    assert 0.7 < share < 0.95
    assert f"Muon at 2e-2 for the blocks' matrices ({t4.muon_params / 1e6:.1f}M, {share:.0%} of the parameters" in line
    assert "Newton-Schulz in fp16)" in line  # a T4 has no bf16 tensor cores
    assert "AdamW at 1e-3, fused, for the embeddings, tied head, norms and biases" in line
    assert "fused AdamW" not in render(t4)
    cpu = make_plan(make("hardware=cpu", "model=small", "optim=adamw", "optim.fused=false"), LAPTOP)
    line = next(s for s in render(cpu).splitlines() if s.strip().startswith("optimizer"))
    assert "AdamW at 1e-3, not fused, for every parameter" in line and "Muon" not in line
