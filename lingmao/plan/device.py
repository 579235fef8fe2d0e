"""What the device decides: where the run is, its memory, threads,
precision, compile, TF32, and the peak its speed is quoted against."""

from __future__ import annotations

from dataclasses import dataclass

from lingmao.plan.calibration import allowed, describe
from lingmao.plan.machine import Gpu, Machine
from lingmao.plan.peaks import peak_for

# CPU presets carry no peak: ~0.1 TFLOPS fp32 per core (AVX-512 FMA at ~2 GHz
# reaches 64 flop/cycle/core at best; a rough figure for the estimate only).
CPU_TFLOPS_PER_CORE = 0.1


@dataclass(frozen=True)
class Where:
    """The device side of a plan, from the resolved preset and the machine."""

    device: str  # cuda | mps | cpu
    gpu: Gpu | None  # the detected GPU the plan sizes for; None off CUDA
    world: int  # processes
    memory_gb: float  # per device
    threads: int
    tf32: bool
    precision: str
    precision_reason: str
    compile: bool
    cpu_candidates: list  # (precision, compile) pairs a CPU calibration times; [] where nothing is measured
    peak: float | None  # TFLOPS of one device at `precision`
    peak_source: str
    ns_dtype: str = "bf16"  # optim=muon's Newton-Schulz: newton_schulz_dtype


def where(hw: dict, m: Machine, world_size: int | None, cpu_choice: dict | None) -> Where:
    """Every device decision of a plan; `cpu_choice`: a CPU calibration's answer, if there is one."""
    device = hw["device"]
    gpu = m.gpu if device == "cuda" else None
    cc = gpu.compute_capability if gpu else hw["compute_capability"]
    world = world_size or int(hw["devices"])
    threads = hw["threads"] or m.cores
    if device == "cpu":  # DDP on CPU: the processes share the cores
        threads = max(1, threads // world)
    # The memory that is there: the detected GPU's, else the preset's (or RAM on CPU).
    memory_gb = gpu.memory_gb if gpu else (float(hw["memory_gb"]) or m.ram_gb)
    tf32 = bool(hw["tf32"]) and device == "cuda" and cc >= 8.0
    precision, reason = choose_precision(hw["precision"], device, cc)
    compile_ = choose_compile(hw["compile"], device)
    measured = device == "cpu" and "auto" in (hw["precision"], hw["compile"])
    candidates = allowed(hw["precision"], hw["compile"]) if measured else []
    if cpu_choice and candidates:
        precision, compile_, reason = cpu_choice["precision"], cpu_choice["compile"], describe(cpu_choice)
    peak, source = device_peak(hw, m, precision, tf32)
    ns = newton_schulz_dtype(device, cc)
    return Where(
        device, gpu, world, memory_gb, threads, tf32, precision, reason, compile_, candidates, peak, source, ns
    )


def newton_schulz_dtype(device: str, cc: float) -> str:
    """Muon's Newton-Schulz dtype: five rounds of three matmuls per matrix and
    step, so it runs where the tensor cores are. bf16 from compute capability
    8.0 (Ampere), as torch.optim.Muon and the speedrun do. Volta and Turing
    (7.x, the T4) have fp16 tensor cores only (65 TFLOPS on a T4 against 8.1
    fp32; bf16 there is emulated): fp16, which the iteration, scaled to
    spectral norm <= 1 first, keeps in range, with 3 more mantissa bits than
    bf16. Older GPUs have no tensor cores: fp32. Off CUDA torch's bf16, as before."""
    if device != "cuda":
        return "bf16"
    if cc >= 8.0:
        return "bf16"
    return "fp16" if cc >= 7.0 else "fp32"


def choose_precision(asked: str, device: str, cc: float) -> tuple[str, str]:
    if device == "cuda":
        # Compute capability, not torch.cuda.is_bf16_supported(): a T4 answers
        # True to that through emulation, yet has no bf16 tensor cores.
        if asked == "fp32":
            return "fp32", "asked for fp32"
        if cc < 8.0:
            return "fp16", f"compute capability {cc} < 8.0 (no bf16 tensor cores): fp16 autocast + GradScaler"
        if asked == "fp16":
            return "fp16", f"asked for fp16 (compute capability {cc} has bf16 too): fp16 autocast + GradScaler"
        return "bf16", f"compute capability {cc} >= 8.0: bf16 autocast, no loss scaling"
    if device == "mps":
        return "fp32", "MPS: fp32 (no AMP on Apple silicon)"
    if asked == "auto":  # a CPU flag does not predict the speed: a calibration decides
        return "fp32", "not measured: fp32 (on CPU a run's calibration chooses, see lingmao.plan.calibration)"
    if asked == "fp16":  # slow on most CPUs, but the fp16 presets' loss scaling then runs on any machine
        return "fp16", "asked for fp16: CPU fp16 autocast + GradScaler (slower than fp32 on most CPUs)"
    return asked, f"asked for {asked}"


def choose_compile(asked, device: str) -> bool:
    """`auto`: on for CUDA, off on MPS and, unless a calibration says otherwise, on CPU."""
    return device == "cuda" if asked == "auto" else bool(asked)


def device_peak(hw: dict, m: Machine, precision: str, tf32: bool) -> tuple[float | None, str]:
    """Peak TFLOPS of ONE device at `precision`, and where the figure comes from."""
    if hw["device"] == "cuda" and m.gpus:
        name = m.gpu.name
        peak = peak_for(name)
        if peak is None:
            return None, f"{name} is not in lingmao.plan.peaks: the engine measures a matmul instead"
        unit = "TF32" if precision == "fp32" and tf32 and peak.tf32 else precision
        return peak.for_precision(precision, tf32), f"{name} datasheet, {unit}"
    if hw["device"] == "cpu":
        return CPU_TFLOPS_PER_CORE * m.cores, f"rough: {CPU_TFLOPS_PER_CORE} TFLOPS x {m.cores} cores"
    if hw["peak_tflops"]:
        return float(hw["peak_tflops"]), f"from the {hw['name']} preset; no such GPU detected here"
    return None, "no peak known: the engine measures a matmul instead"
