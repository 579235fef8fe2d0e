"""`suite=gpu`: MFU of lingmao's models on a CUDA GPU, against the device's
datasheet peak and against a bf16 matmul measured in the same process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lingmao.bench.options import OptionError
from lingmao.bench.suite import Suite, silent_tracker
from lingmao.plan.peaks import dense_bf16_tflops

if TYPE_CHECKING:
    from lingmao.bench.measure import Result

# Seed 000's throughput table: RTX 4090, batch 32, context 512, medium: 40-60
# samples/s; its peak, 165.2 dense bf16 TFLOPS, is the rtx4090 preset's.
SEED_4090_SAMPLES_PER_SEC = (40.0, 60.0)
SEED_4090_TFLOPS = 165.2

FAST = {"hardware.precision": "bf16", "hardware.compile": True, "optim.fused": True}
SEED_ROW = "medium ctx 512 batch 32"
# (label, model, values): the models at FAST, medium with fp16, and seed 000's row.
GPU_RUNS = [
    *((f"{m} bf16", m, FAST) for m in ("small", "medium", "large")),
    ("medium fp16+GradScaler", "medium", {**FAST, "hardware.precision": "fp16"}),
    (SEED_ROW, "medium", {**FAST, "model.context_length": 512, "hardware.batch": 32, "hardware.accumulation": 1}),
]


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            f"suite=gpu measures a CUDA GPU and torch {torch.__version__} sees none here "
            f"(CUDA build: {torch.version.cuda or 'no'}). Run it on a machine with an NVIDIA GPU; "
            f"here, use suite=cpu or benchmark mode (no suite=)."
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise OptionError(
            f"suite=gpu times bf16 and the flash SDPA kernel, which need compute capability >= 8.0 "
            f"(Ampere); {torch.cuda.get_device_name()} has {major}.{minor}. Benchmark mode "
            f"(no suite=) measures this GPU at its plan's precision."
        )


def peaks_here(s: Suite) -> tuple[str, float, float]:
    """(device name, dense bf16 peak TFLOPS from its datasheet or else the
    preset, bf16 matmul TFLOPS measured here), printed."""
    import torch

    from lingmao.train.backend import matmul_tflops

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    dense = dense_bf16_tflops(name) or s.plan.peak_tflops_per_device
    measured = matmul_tflops(device, torch.bfloat16)
    print(
        f"{name}: dense bf16 peak {dense:,.1f} TFLOPS "
        f"({'datasheet' if dense_bf16_tflops(name) else 'preset ' + s.plan.preset}); "
        f"bf16 matmul measured here {measured:,.1f} TFLOPS"
    )
    return name, dense, measured


def time_run(s: Suite, label: str, model: str, values: dict, warmup: int, peaks: dict[str, float]) -> Result:
    """Benchmark one of GPU_RUNS on synthetic tokens and print its lines; its
    compiled graphs and cached memory are dropped after, before the next."""
    import torch

    from lingmao.bench.measure import benchmark, train_tokens

    cfg, plan = s.variant(model, **values)
    windows = (warmup + s.opts.steps + 10 + 1) * plan.effective_batch  # + benchmark()'s split steps
    tokens, vocab, stride, _ = train_tokens(cfg, True, s.opts.vocab, windows)
    r = benchmark(
        cfg,
        plan,
        tokens,
        vocab,
        stride,
        steps=s.opts.steps,
        warmup=warmup,
        tracker=silent_tracker(),
        peaks=peaks,
        matmul=False,
        flash=True,
        label=label,
    )
    print(
        f"{label}: {r.params / 1e6:.0f}M params, micro-batch {plan.micro_batch} x {plan.accumulation}, "
        f"context {r.context_length}"
    )
    print("\n".join(r.lines()))
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return r


def scaled_seed_row(seed: Result, dense: float) -> float:
    """The upper end of seed 000's RTX 4090 row scaled to this GPU by the
    peak ratio: what the seed's code would reach here. Printed against the
    measured row."""
    scaled = SEED_4090_SAMPLES_PER_SEC[1] * dense / SEED_4090_TFLOPS
    print(
        f"medium, context 512, batch 32: {seed.samples_per_sec:,.1f} samples/s = "
        f"{seed.samples_per_sec / scaled:.1f}x seed 000's RTX 4090 row ({SEED_4090_SAMPLES_PER_SEC[0]:.0f}-"
        f"{SEED_4090_SAMPLES_PER_SEC[1]:.0f} samples/s) scaled by the peak ratio {dense:.0f}/{SEED_4090_TFLOPS} "
        f"(-> {scaled:,.0f} samples/s)"
    )
    return scaled


def gpu_suite(s: Suite) -> dict:
    """small/medium/large with bf16 autocast, torch.compile, fused AdamW and
    the flash SDPA kernel, at the plan's micro-batch and accumulation; medium
    again with fp16 + GradScaler; medium at context 512, batch 32 (seed 000's
    RTX 4090 row). Synthetic tokens: this suite measures the GPU, suite=cpu
    and benchmark mode measure the data path."""
    name, dense, measured = peaks_here(s)
    peaks = {f"{name} dense bf16 peak": dense, "bf16 matmul measured here": measured}
    warmup = max(3, s.opts.warmup)  # compilation, then autotuned kernels settle
    results = {label: time_run(s, label, model, values, warmup, peaks) for label, model, values in GPU_RUNS}
    seed = results[SEED_ROW]
    scaled = scaled_seed_row(seed, dense)
    out = {
        "summary": f"medium ctx 512: {seed.samples_per_sec / scaled:.1f}x the seed's scaled 4090 row; "
        + "; ".join(f"{k} MFU {r.mfu(next(iter(peaks))):.1%}" for k, r in results.items()),
        "device": name,
        "dense_bf16_tflops": dense,
        "matmul_bf16_tflops": measured,
        "seed_row_scaled_samples_per_sec": scaled,
        "seed_row_ratio": seed.samples_per_sec / scaled,
    }
    out.update({label: r.metrics("") for label, r in results.items()})
    return out
