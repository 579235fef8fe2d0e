"""The run plan: a pure function (config, machine) -> Plan.

The engine reads the Plan, never the raw hardware preset. `plan=true` prints
it for any preset on any machine (a CUDA preset on a CPU-only laptop too):
nothing here touches a GPU or the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from omegaconf import OmegaConf

from .config import CONF_DIR, ConfigError
from .machine import Machine
from .optim import scaled_lr

PRESETS = tuple(sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml") if p.stem != "auto"))


@dataclass
class Plan:
    preset: str
    preset_reason: str
    device: str
    devices: int
    world_size: int
    ddp_backend: str
    precision: str  # bf16 | fp16 | fp32
    precision_reason: str
    grad_scaler: bool
    tf32: bool
    cudnn_benchmark: bool
    alloc_conf: str
    compile: bool
    compile_mode: str
    threads: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    micro_batch: int
    accumulation: int
    effective_batch: int
    context_length: int
    lr_scaling: str
    base_lr: float
    lr: float
    fused_optimizer: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A readable two-column table."""
        width = max(len(f.name) for f in fields(self))
        lines = [f"{k:<{width}}  {v}" for k, v in self.as_dict().items() if k != "notes"]
        lines += [f"{'note':<{width}}  {n}" for n in self.notes]
        return "\n".join(lines)


def load_preset(name: str) -> dict:
    path = CONF_DIR / "hardware" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"hardware={name!r} is not a preset; choose one of: auto, {', '.join(PRESETS)}")
    return OmegaConf.to_container(OmegaConf.load(path))


def closest_preset(m: Machine) -> tuple[str, str]:
    """The preset that fits the machine best, and why."""
    if m.gpus:
        g = m.gpus[0]
        if g.compute_capability < 8.0:
            return "t4x2", f"{len(m.gpus)} x {g.name} (compute capability {g.compute_capability} < 8.0: fp16)"
        if g.memory_gb >= 20:
            return "rtx4090", f"{g.name}, {g.memory_gb:.0f} GB, compute capability {g.compute_capability}"
        return "rtx3060", f"{g.name}, {g.memory_gb:.0f} GB (< 20 GB)"
    if m.mps:
        return "m1", "Apple MPS device"
    return "cpu", f"no GPU; {m.cores} cores"


def resolve_hardware(hw: dict, m: Machine) -> tuple[dict, str]:
    """Fill `auto` from the closest preset; keys the user set still win."""
    if hw["name"] != "auto":
        return hw, f"hardware={hw['name']} (chosen)"
    name, why = closest_preset(m)
    resolved = load_preset(name)
    resolved.update({k: v for k, v in hw.items() if v is not None and k != "name"})
    return resolved, f"hardware=auto -> {name}: {why}"


def choose_precision(asked: str, device: str, cc: float, m: Machine) -> tuple[str, str]:
    if device == "cuda":
        # Compute capability, not torch.cuda.is_bf16_supported(): a T4 answers
        # True to that through emulation, yet has no bf16 tensor cores.
        if asked in ("auto", "bf16") and cc >= 8.0:
            return "bf16", f"compute capability {cc} >= 8.0: bf16 autocast, no loss scaling"
        if asked == "fp32":
            return "fp32", "asked for fp32"
        return "fp16", f"compute capability {cc} < 8.0 (no bf16 tensor cores): fp16 autocast + GradScaler"
    if device == "mps":
        return "fp32", "MPS: fp32 (seed 000: no AMP on Apple silicon)"
    if asked == "auto":
        if m.native_bf16_cpu:
            return "bf16", "CPU has native bf16 (AMX / AVX512-BF16): bf16 autocast"
        return "fp32", "CPU without native bf16: fp32"
    if asked == "fp16":
        return "fp32", "fp16 autocast is not useful on CPU: fp32"
    return asked, f"asked for {asked}"


def make_plan(cfg, m: Machine) -> Plan:
    """`cfg` is the composed RunConfig (DictConfig or dataclass)."""
    hw_in = OmegaConf.to_container(cfg.hardware) if OmegaConf.is_config(cfg.hardware) else asdict(cfg.hardware)
    hw, preset_reason = resolve_hardware(hw_in, m)
    missing = [k for k, v in hw.items() if v is None and k not in ("prefetch_factor",)]
    if missing:
        raise ConfigError(f"hardware={hw['name']} leaves {', '.join(missing)} unset")
    notes = []
    device = hw["device"]
    gpu_cc = m.gpus[0].compute_capability if (device == "cuda" and m.gpus) else hw["compute_capability"]
    precision, precision_reason = choose_precision(hw["precision"], device, gpu_cc, m)
    if hw["batch"] == "auto":
        raise ConfigError("hardware.batch=auto needs the memory estimate (not available yet); give an integer")
    micro, accum, devices = int(hw["batch"]), int(hw["accumulation"]), int(hw["devices"])
    effective = micro * devices * accum
    o = cfg.optim
    lr = scaled_lr(o.lr, o.base_batch, effective, o.lr_scaling)
    threads = hw["threads"] or m.cores
    return Plan(
        preset=hw["name"], preset_reason=preset_reason, device=device, devices=devices,
        world_size=devices, ddp_backend=hw["ddp_backend"],
        precision=precision, precision_reason=precision_reason, grad_scaler=precision == "fp16",
        tf32=bool(hw["tf32"]) and device == "cuda" and gpu_cc >= 8.0,
        cudnn_benchmark=bool(hw["cudnn_benchmark"]) and device == "cuda",
        alloc_conf=hw["alloc_conf"] if device == "cuda" else "",
        compile=bool(hw["compile"]), compile_mode=hw["compile_mode"], threads=threads,
        num_workers=hw["num_workers"], pin_memory=bool(hw["pin_memory"]) and device == "cuda",
        persistent_workers=bool(hw["persistent_workers"]) and hw["num_workers"] > 0,
        prefetch_factor=hw["prefetch_factor"] if hw["num_workers"] > 0 else None,
        micro_batch=micro, accumulation=accum, effective_batch=effective,
        context_length=cfg.model.context_length, lr_scaling=o.lr_scaling, base_lr=o.lr, lr=lr,
        fused_optimizer=o.fused if o.fused is not None else device == "cuda",
        notes=notes,
    )


def runnable_plan(cfg, m: Machine) -> Plan:
    """The plan, refused before any work if the machine lacks its device;
    with hardware.fallback=true, a warning and the closest preset instead."""
    plan = make_plan(cfg, m)
    have = {"cuda": len(m.gpus), "mps": int(m.mps), "cpu": plan.devices}[plan.device]
    if have >= plan.devices:
        return plan
    closest = closest_preset(m)[0]
    msg = (f"hardware={plan.preset} needs {plan.devices} {plan.device} device(s) but this machine has "
           f"{len(m.gpus)} CUDA GPU(s){' and MPS' if m.mps else ''}; use hardware=auto, hardware={closest}, "
           f"or hardware.fallback=true to run on what exists")
    if not cfg.hardware.fallback:
        raise ConfigError(msg)
    fallback_cfg = OmegaConf.merge(cfg, {"hardware": {**{k: None for k in cfg.hardware if k not in ("name", "fallback")}, "name": "auto"}})
    plan = make_plan(fallback_cfg, m)
    plan.notes.append("fallback: " + msg)
    return plan
