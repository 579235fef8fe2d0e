"""The run plan: a pure function (config, machine) -> Plan.

The engine reads the Plan, never the raw hardware preset. `plan=true` prints
it for any preset on any machine (a CUDA preset on a CPU-only laptop too):
nothing here touches a GPU or the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from omegaconf import OmegaConf

import math

from .config import CONF_DIR, ConfigError
from .estimate import GiB, MARGIN, estimate_memory, estimate_step_time, fit_micro_batch, flops_per_token
from .machine import Machine
from .optim import scaled_lr

# Vocabulary the estimates assume: the default corpus' (chinese-poetry 2.0.1,
# simplified, measured). The plan never reads the data, so it cannot know yours.
DEFAULT_VOCAB = 13563
# CPU presets carry no peak: ~0.1 TFLOPS fp32 per core (AVX-512 FMA at ~2 GHz
# reaches 64 flop/cycle/core at best; a rough figure for the estimate only).
CPU_TFLOPS_PER_CORE = 0.1
ASSUMED_MFU = 0.4

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
    memory_gb: float  # per device: the preset's, or the machine's RAM on CPU
    estimate_gb: float  # training memory per device, estimated (± margin)
    estimate_checkpointed_gb: float  # the same with activation checkpointing
    estimate_margin: float
    headroom_gb: float
    fits: bool
    vocab_assumed: int
    peak_tflops: float
    est_step_seconds: float
    est_tokens_per_sec: float
    notes: list[str] = field(default_factory=list)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    loss_chunk: int = 0  # tokens of logits at a time in the training loss (0: the whole micro-batch)

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
            return "bf16", "CPU has AMX bf16 tiles: bf16 autocast"
        return "fp32", "CPU without AMX: fp32 (bf16 autocast measured slower there)"
    if asked == "fp16":
        return "fp32", "fp16 autocast is not useful on CPU: fp32"
    return asked, f"asked for {asked}"


def shape_params(shape: dict) -> int:
    from .estimate import count_params

    return count_params(shape["d_model"], shape["n_heads"], shape["n_layers"], shape["context_length"],
                        shape["vocab_size"], shape["mlp_ratio"])


def _batch(hw: dict, memory_gb: float, shape: dict, devices: int, notes: list) -> tuple[int, int]:
    """(micro-batch, accumulation). `batch: auto` keeps the preset's micro-batch
    if it fits, else takes the largest that fits and raises accumulation so
    the effective batch stays the preset's."""
    if hw["batch"] != "auto":
        return int(hw["batch"]), int(hw["accumulation"])
    preset_batch = load_preset(hw["name"]).get("batch") if hw["name"] in PRESETS else None
    wanted = preset_batch if isinstance(preset_batch, int) else 8
    target = wanted * int(hw["accumulation"])
    best = fit_micro_batch(int(memory_gb * GiB / (1 + MARGIN)), headroom=1.0, max_batch=wanted, **shape)
    if best == 0:
        raise ConfigError(f"hardware.batch=auto: even micro-batch 1 does not fit in {memory_gb:.0f} GB "
                          f"for this model; choose a smaller model or context")
    accum = math.ceil(target / best)
    notes.append(f"batch=auto: micro-batch {best} (largest that fits, up to the preset's {wanted}), "
                 f"accumulation {accum} (effective {best * accum * devices})")
    return best, accum


def make_plan(cfg, m: Machine, world_size: int | None = None) -> Plan:
    """`cfg` is the composed RunConfig (DictConfig or dataclass). `world_size`:
    the processes of a launcher that set WORLD_SIZE (torchrun across nodes),
    when not the preset's `devices` on this one machine."""
    hw_in = OmegaConf.to_container(cfg.hardware) if OmegaConf.is_config(cfg.hardware) else asdict(cfg.hardware)
    hw, preset_reason = resolve_hardware(hw_in, m)
    missing = [k for k, v in hw.items() if v is None and k not in ("prefetch_factor",)]
    if missing:
        raise ConfigError(f"hardware={hw['name']} leaves {', '.join(missing)} unset")
    notes = []
    device = hw["device"]
    gpu_cc = m.gpus[0].compute_capability if (device == "cuda" and m.gpus) else hw["compute_capability"]
    precision, precision_reason = choose_precision(hw["precision"], device, gpu_cc, m)
    devices = int(hw["devices"])
    mc = cfg.model
    shape = dict(d_model=mc.d_model, n_heads=mc.n_heads, n_layers=mc.n_layers, context_length=mc.context_length,
                 vocab_size=DEFAULT_VOCAB, mlp_ratio=mc.mlp_ratio, precision=precision, dropout=mc.dropout,
                 device=device)
    memory_gb = float(hw["memory_gb"]) or m.ram_gb
    if device == "cuda" and m.gpus and hw_in["name"] == "auto":  # the real GPU, not the preset's
        memory_gb = m.gpus[0].memory_gb
    world = world_size or devices
    micro, accum = _batch(hw, memory_gb, shape, world, notes)
    effective = micro * world * accum
    est = estimate_memory(micro_batch=micro, **shape)
    est_ckpt = estimate_memory(micro_batch=micro, activation_checkpointing=True, **shape)
    fits = est.total * (1 + MARGIN) <= memory_gb * GiB
    if not fits:
        best = fit_micro_batch(int(memory_gb * GiB / (1 + MARGIN)), headroom=1.0, **shape)
        notes.append(f"micro-batch {micro} needs ~{est.gb():.1f} GB (±{MARGIN:.0%}) of {memory_gb:.0f} GB: "
                     + (f"use hardware.batch={best} with hardware.accumulation={math.ceil(micro * accum / best)} "
                        f"(same effective batch), or hardware.batch=auto" if best else
                        "even micro-batch 1 does not fit: choose a smaller model or context"))
    peak = float(hw["peak_tflops"]) or CPU_TFLOPS_PER_CORE * m.cores
    n_no_pos = shape_params(shape) - mc.context_length * mc.d_model
    step_s = estimate_step_time(flops_per_token=flops_per_token(mc.d_model, mc.n_layers, mc.context_length, n_no_pos),
                                tokens_per_step=micro * accum * mc.context_length, peak_tflops=peak,
                                mfu=ASSUMED_MFU)
    o = cfg.optim
    lr = scaled_lr(o.lr, o.base_batch, effective, o.lr_scaling)
    threads = hw["threads"] or m.cores
    if device == "cpu":  # DDP on CPU: the processes share the cores
        threads = max(1, threads // devices)
    return Plan(
        preset=hw["name"], preset_reason=preset_reason, device=device, devices=devices,
        world_size=world, ddp_backend=hw["ddp_backend"],
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
        # One kernel over all tensors; on this 2-core CPU AdamW's step for the
        # small model took 43 ms fused vs 166 ms in the default per-tensor loop.
        fused_optimizer=o.fused if o.fused is not None else device in ("cuda", "cpu"),
        memory_gb=round(memory_gb, 1), estimate_gb=round(est.gb(), 2),
        estimate_checkpointed_gb=round(est_ckpt.gb(), 2), estimate_margin=MARGIN,
        headroom_gb=round(memory_gb - est.gb(), 2), fits=fits, vocab_assumed=DEFAULT_VOCAB, peak_tflops=peak,
        est_step_seconds=round(step_s, 4), est_tokens_per_sec=round(effective * mc.context_length / step_s),
        notes=notes,
    )


def runnable_plan(cfg, m: Machine, world_size: int | None = None) -> Plan:
    """The plan, refused before any work if the machine lacks its device;
    with hardware.fallback=true, a warning and the closest preset instead."""
    plan = make_plan(cfg, m, world_size)
    if not plan.fits:
        raise ConfigError(f"hardware={plan.preset} model={cfg.model.name}: " + plan.notes[-1])
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
    plan = make_plan(fallback_cfg, m, world_size)
    plan.notes.append("fallback: " + msg)
    return plan
