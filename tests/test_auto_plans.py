"""`lingmao run hardware=auto plan=true` on five cards, faked as detect()
would report them (NVML's names and total memory in GiB): the preset each
maps to and the plan for each model size."""

import pytest
from test_config import make

from lingmao.plan.machine import Gpu, Machine
from lingmao.plan.make import make_plan

CARDS = {
    "H200": Machine(cores=16, ram_gb=128, gpus=(Gpu("NVIDIA H200", 140.4, 9.0),)),
    "A100-80GB": Machine(cores=16, ram_gb=128, gpus=(Gpu("NVIDIA A100-SXM4-80GB", 80.0, 8.0),)),
    "T4": Machine(cores=2, ram_gb=12, gpus=(Gpu("Tesla T4", 15.0, 7.5),)),  # Colab and Kaggle
    "RTX 4090": Machine(cores=16, ram_gb=64, gpus=(Gpu("NVIDIA GeForce RTX 4090", 24.0, 8.9),)),
    "RTX 3060": Machine(cores=8, ram_gb=32, gpus=(Gpu("NVIDIA GeForce RTX 3060", 12.0, 8.6),)),
}

# (card, model) -> (preset, micro-batch, accumulation, precision). The large
# cards hold the datacenter preset's 256-sample batch in one micro-batch where
# the estimate fits it, else the largest divisor of 256 that fits; the T4
# keeps t4x2's 256 in fp16 with a GradScaler (no bf16 tensor cores before
# compute capability 8.0); the desktop cards keep the seed's 32-sample steps.
PLANS = {
    ("H200", "small"): ("datacenter", 256, 1, "bf16"),
    ("H200", "medium"): ("datacenter", 256, 1, "bf16"),
    ("H200", "large"): ("datacenter", 128, 2, "bf16"),
    ("A100-80GB", "small"): ("datacenter", 256, 1, "bf16"),
    ("A100-80GB", "medium"): ("datacenter", 128, 2, "bf16"),
    ("A100-80GB", "large"): ("datacenter", 64, 4, "bf16"),
    ("T4", "small"): ("t4", 32, 8, "fp16"),
    ("T4", "medium"): ("t4", 16, 16, "fp16"),
    ("T4", "large"): ("t4", 8, 32, "fp16"),
    ("RTX 4090", "small"): ("rtx4090", 16, 2, "bf16"),
    ("RTX 4090", "medium"): ("rtx4090", 16, 2, "bf16"),
    ("RTX 4090", "large"): ("rtx4090", 16, 2, "bf16"),
    ("RTX 3060", "small"): ("rtx3060", 8, 4, "bf16"),
    ("RTX 3060", "medium"): ("rtx3060", 8, 4, "bf16"),
    ("RTX 3060", "large"): ("rtx3060", 4, 8, "bf16"),
}
PEAKS = {"H200": 989.4, "A100-80GB": 312.0, "T4": 65.0, "RTX 4090": 165.2, "RTX 3060": 25.6}


@pytest.mark.parametrize("card, model", PLANS)
def test_auto_plans_each_card_as_an_engineer_would(card, model):
    plan = make_plan(make(f"model={model}"), CARDS[card])
    preset, micro, accum, precision = PLANS[card, model]
    assert (plan.preset, plan.micro_batch, plan.accumulation, plan.precision) == (preset, micro, accum, precision)
    assert plan.fits and not plan.activation_checkpointing and plan.compile
    assert plan.effective_batch == plan.target_effective_batch
    assert plan.grad_scaler == (precision == "fp16") and plan.tf32 == (precision == "bf16")
    assert plan.peak_tflops_per_device == PEAKS[card]  # the card's own datasheet figure, not the preset's
    assert plan.memory_gb == CARDS[card].gpu.memory_gb


def test_the_datacenter_preset_takes_the_whole_batch_where_it_fits_and_the_largest_micro_batch_else():
    from lingmao.plan.estimate import model_shape
    from lingmao.plan.memory import estimate_memory

    for card, model in [("H200", "medium"), ("H200", "large"), ("A100-80GB", "large")]:
        plan = make_plan(make(f"model={model}"), CARDS[card])
        shape = model_shape(
            make(f"model={model}").model,
            vocab=plan.vocab_assumed,
            precision="bf16",
            device="cuda",
            ddp=False,
            optimizer="muon",
        )
        if plan.accumulation > 1:  # the next divisor of 256 up does not fit, margin kept
            need = estimate_memory(micro_batch=2 * plan.micro_batch, **shape).gb() * (1 + plan.estimate_margin)
            assert need > plan.memory_gb
        assert plan.estimate_gb * (1 + plan.estimate_margin) <= plan.memory_gb


@pytest.mark.parametrize("card", CARDS)
def test_plan_true_prints_the_preset_the_split_and_the_precision(card, tmp_path, monkeypatch, capsys):
    from lingmao.plan import machine
    from lingmao.run import execute

    monkeypatch.setattr(machine, "detect", lambda: CARDS[card])
    execute(make("hardware=auto", "model=small", "plan=true"), tmp_path, tmp_path / "run")
    out = capsys.readouterr().out
    preset, micro, accum, precision = PLANS[card, "small"]
    assert out.startswith(f"FITS  hardware={preset} model=small")
    assert f"hardware=auto -> {preset}: 1 x {CARDS[card].gpu.name}" in out
    assert f"micro-batch {micro} x accumulation {accum} x 1 device(s)" in out
    assert f"precision    {precision}" in out
