"""The run plan: a pure function (config, machine) -> Plan.

The engine reads the Plan, never the raw hardware preset. `plan=true` prints
it for any preset on any machine (a CUDA preset on a CPU-only laptop too):
nothing here touches a GPU or the data.

A preset is a target: the effective batch it wants (samples per optimizer
step, over all devices) and the micro-batch it prefers. For each model the
plan takes the largest micro-batch up to the preferred one that fits in memory
and divides the per-device batch, so micro x accumulation x devices is the
preset's effective batch exactly: two presets with the same effective batch
then see the same data and LR at every step and differ only in speed.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from omegaconf import OmegaConf

from lingmao.config.rules import CONF_DIR, ConfigError
from lingmao.plan.batch import Fit, budget_bytes, fit_batch, model_shape, refusal, suggest_split
from lingmao.plan.calibration import describe, shape_of
from lingmao.plan.calibration import name as candidate_name
from lingmao.plan.estimate import MARGIN, GiB, count_params, estimate_memory, estimate_step_time, flops_per_token
from lingmao.plan.lr import lr_source, scaled_lr
from lingmao.plan.machine import Machine
from lingmao.plan.peaks import peak_for

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
    model: str  # model.name
    preset_reason: str
    device: str
    device_name: str  # the detected GPU's name; "" when none was detected
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
    target_effective_batch: int  # the preset's (or hardware.effective_batch's) target
    batch_reason: str
    activation_checkpointing: bool  # the model recomputes each block's activations in backward
    context_length: int
    lr_scaling: str
    base_lr: float
    base_batch: int
    lr: float
    lr_source: str  # where base_lr came from: optim.lr, or optim.lr_by_size.<model> by default
    muon_lr: float | None  # optim=muon: Muon's LR for the blocks' matrices, not batch-scaled; None: AdamW alone
    fused_optimizer: bool
    params: int
    memory_gb: float  # per device: the detected GPU's, the preset's, or the machine's RAM on CPU
    estimate_gb: float  # training memory per device as planned (checkpointing included when on), ± margin
    estimate_parts_gb: dict  # the estimate's terms (params, grads, ..., logits), GiB
    estimate_checkpointed_gb: float | None  # with activation checkpointing; only where it was considered
    estimate_margin: float
    headroom_gb: float
    fits: bool
    refusal: str  # why it does not fit and what would; "" when it fits
    vocab_assumed: int
    peak_tflops_per_device: float | None  # datasheet peak of ONE device at the plan's precision; None: unknown
    peak_source: str
    assumed_mfu: float | None  # of the peak, for the time estimates; None: the time was measured (CPU calibration)
    est_step_seconds: float | None
    est_run_seconds: float | None  # trainer.max_steps steps; None without max_steps or a peak
    est_tokens_per_sec: float | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    loss_chunk: int = 0  # tokens of logits at a time in the training loss (0: the whole micro-batch)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        from lingmao.plan.summary import render

        return render(self)


def exit_status(plan: Plan) -> int:
    """The process exit status for `plan=true`: 0 when the plan fits, 3 when it does not."""
    return 0 if plan.fits else 3


def load_preset(name: str) -> dict:
    return dict(_preset(name))


@functools.cache
def _preset(name: str) -> dict:
    path = CONF_DIR / "hardware" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"hardware={name!r} is not a preset; choose one of: auto, {', '.join(PRESETS)}")
    return OmegaConf.to_container(OmegaConf.load(path))


def closest_preset(m: Machine) -> tuple[str, str]:
    """The preset that fits the machine best, and why. On CUDA the plan then
    uses the detected count, name and memory, not the preset's."""
    if m.gpus:
        g, n = m.gpu, len(m.gpus)
        what = f"{n} x {g.name}, {g.memory_gb:.0f} GB, compute capability {g.compute_capability}"
        if g.compute_capability < 8.0:
            return ("t4x2" if n >= 2 else "t4"), f"{what} (< 8.0: no bf16, fp16 + GradScaler)"
        return ("rtx4090" if g.memory_gb >= 20 else "rtx3060"), f"{what} ({'>=' if g.memory_gb >= 20 else '<'} 20 GB)"
    if m.mps:
        return "m1", "Apple MPS device"
    return "cpu", f"no GPU; {m.cores} cores"


def resolve_hardware(hw: dict, m: Machine) -> tuple[dict, str]:
    """Fill `auto` from the closest preset; keys the user set still win. On a
    CUDA machine `auto` takes the detected GPU count for `devices`."""
    if hw["name"] != "auto":
        return hw, f"hardware={hw['name']} (chosen)"
    name, why = closest_preset(m)
    resolved = load_preset(name)
    if m.gpus and resolved["device"] == "cuda":
        resolved["devices"] = len(m.gpus)
    resolved.update({k: v for k, v in hw.items() if v is not None and k != "name"})
    return resolved, f"hardware=auto -> {name}: {why}"


def choose_precision(asked: str, device: str, cc: float, m: Machine) -> tuple[str, str]:
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
    if asked == "auto":  # a CPU flag does not predict the speed: a calibration decides (calibrate.py)
        return "fp32", "not measured: fp32 (on CPU a run's calibration chooses, see lingmao.plan.calibration)"
    if asked == "fp16":
        return "fp32", "fp16 autocast is not useful on CPU: fp32"
    return asked, f"asked for {asked}"


def choose_compile(asked, device: str) -> bool:
    """`auto`: on for CUDA, off on MPS and, unless a calibration says otherwise, on CPU."""
    return device == "cuda" if asked == "auto" else bool(asked)


def calibrated(cfg, hw: dict, threads: int, run_seconds: float | None, cpu_choice) -> dict | None:
    """On CPU with precision or compile `auto`: cpu_choice's measured answer
    (calibrate.choose), None where nothing is to be measured."""
    if hw["device"] != "cpu" or "auto" not in (hw["precision"], hw["compile"]) or cpu_choice is None:
        return None
    model = OmegaConf.to_container(cfg.model) if OmegaConf.is_config(cfg.model) else asdict(cfg.model)
    return cpu_choice(shape_of(model, DEFAULT_VOCAB, threads), hw["precision"], hw["compile"], run_seconds)


def run_seconds(cfg, step_s: float | None) -> float | None:
    """The run's expected length: trainer.max_time, or the estimated steps' time if shorter."""
    bounds = [
        x for x in (cfg.trainer.max_time, step_s and cfg.trainer.max_steps and step_s * cfg.trainer.max_steps) if x
    ]
    return min(bounds) if bounds else None


def measured_step_seconds(choice: dict, tokens_per_step: int) -> float:
    """Seconds per optimizer step from the calibration's timing of its winner."""
    winner = candidate_name(choice["precision"], choice["compile"])
    return choice["seconds"][winner] / choice["tokens"] * tokens_per_step


def shape_params(shape: dict) -> int:
    return count_params(
        shape["d_model"],
        shape["n_heads"],
        shape["n_layers"],
        shape["context_length"],
        shape["vocab_size"],
        shape["mlp_ratio"],
        rotary=shape["rotary"],
        qk_norm=shape["qk_norm"],
        moe_experts=shape["moe_experts"],
        vocab_multiple=shape["vocab_multiple"],
    )


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


def _targets(hw: dict) -> tuple[dict, int, str | None, bool]:
    """(the preset, the target effective batch, a warning when that is not the
    preset's, whether the user fixed the split by setting batch or accumulation)."""
    preset = load_preset(hw["name"]) if hw["name"] in PRESETS else hw
    target = int(hw["effective_batch"])
    warn = None
    if target != int(preset["effective_batch"]):
        warn = (
            f"hardware.effective_batch={target} is not the {hw['name']} preset's {preset['effective_batch']}: "
            f"runs are comparable step by step only at the same effective batch"
        )
    fixed = hw["batch"] != "auto" and (hw["batch"], hw["accumulation"]) != (preset["batch"], preset["accumulation"])
    return preset, target, warn, fixed


def plan_batch(hw: dict, shape: dict, memory_gb: float, world: int, notes: list, warnings: list) -> Fit:
    """Micro-batch, accumulation and checkpointing for this model on this device."""
    preset, target, warn, fixed = _targets(hw)
    if warn:
        warnings.append(warn)
    budget = budget_bytes(memory_gb)
    forced_ckpt = bool(hw["activation_checkpointing"])
    if fixed:
        micro, accum = int(hw["batch"]), int(hw["accumulation"])
        fit = fit_batch(shape, budget, micro * accum * world, world, micro, forced_ckpt, exact_micro=True)
        fit.reason = f"micro-batch {micro} x accumulation {accum} set by hardware.batch/hardware.accumulation"
        if micro * accum * world != target:
            warnings.append(
                f"hardware.batch={micro} x hardware.accumulation={accum} x {world} device(s) = "
                f"{micro * accum * world}, not the {hw['name']} preset's effective batch {target}: "
                f"runs are comparable step by step only at the same effective batch"
            )
        if not fit.fits:
            fit.refusal = suggest_split(shape, budget, micro, accum, world, memory_gb)
        return fit
    if hw["batch"] == "auto" and hw["accumulation"] != preset["accumulation"]:
        warnings.append(
            f"hardware.accumulation={hw['accumulation']} is ignored with hardware.batch=auto: the plan "
            f"derives it from hardware.effective_batch={target}; set that to change the batch"
        )
    preferred = preset["batch"] if hw["batch"] == "auto" else hw["batch"]
    fit = fit_batch(shape, budget, target, world, int(preferred), forced_ckpt)
    if not fit.fits:
        fit.refusal = refusal(shape, budget, memory_gb)
    if fit.effective != target:
        warnings.append(fit.note)
    elif fit.fits and fit.micro < int(preferred):  # the plan changed the preset's split: say so
        notes.append(fit.note)
    return fit


def step_seconds(mc, n_params: int, fit: Fit, peak: float | None) -> float | None:
    """Seconds per optimizer step at ASSUMED_MFU of `peak`; None without a peak."""
    if not peak:
        return None
    no_pos = n_params - (0 if mc.rotary else mc.context_length * mc.d_model)
    per_token = flops_per_token(mc.d_model, mc.n_layers, mc.context_length, no_pos)
    s = estimate_step_time(
        flops_per_token=per_token,
        tokens_per_step=fit.micro * fit.accum * mc.context_length,
        peak_tflops=peak,
        mfu=ASSUMED_MFU,
    )
    return s * 4 / 3 if fit.checkpointing else s  # checkpointing runs each block's forward twice: ~1 more of 3 passes


def make_plan(cfg, m: Machine, world_size: int | None = None, cpu_choice=None) -> Plan:
    """`cfg` is the composed RunConfig (DictConfig or dataclass). `world_size`:
    the processes of a launcher that set WORLD_SIZE (torchrun across nodes),
    when not the preset's `devices` on this one machine. `cpu_choice`: the
    CPU calibration (calibrate.chooser), which times this machine; without it
    the plan is a pure function and `auto` on CPU means fp32 eager."""
    hw_in = OmegaConf.to_container(cfg.hardware) if OmegaConf.is_config(cfg.hardware) else asdict(cfg.hardware)
    hw, preset_reason = resolve_hardware(hw_in, m)
    missing = [k for k, v in hw.items() if v is None and k not in ("prefetch_factor",)]
    if missing:
        raise ConfigError(f"hardware={hw['name']} leaves {', '.join(missing)} unset")
    notes, warnings = [], []
    device = hw["device"]
    gpu = m.gpu if device == "cuda" else None
    cc = gpu.compute_capability if gpu else hw["compute_capability"]
    precision, precision_reason = choose_precision(hw["precision"], device, cc, m)
    tf32 = bool(hw["tf32"]) and device == "cuda" and cc >= 8.0
    world = world_size or int(hw["devices"])
    mc = cfg.model
    shape = model_shape(mc, vocab=DEFAULT_VOCAB, precision=precision, device=device, ddp=world > 1)
    # The memory that is there: the detected GPU's, else the preset's (or RAM on CPU).
    memory_gb = gpu.memory_gb if gpu else (float(hw["memory_gb"]) or m.ram_gb)
    fit = plan_batch(hw, shape, memory_gb, world, notes, warnings)
    est = estimate_memory(micro_batch=max(fit.micro, 1), activation_checkpointing=fit.checkpointing, **shape)
    if fit.fits and fit.checkpointing and not hw["activation_checkpointing"]:
        notes.append(f"activation checkpointing on: without it even micro-batch 1 does not fit in {memory_gb:.0f} GB")
    show_ckpt = fit.checkpointing or not fit.fits
    ckpt_gb = estimate_memory(micro_batch=max(fit.micro, 1), activation_checkpointing=True, **shape).gb()
    peak, peak_source = device_peak(hw, m, precision, tf32)
    n = shape_params(shape)
    step_s = step_seconds(mc, n, fit, peak)
    max_steps = cfg.trainer.max_steps
    o = cfg.optim
    threads = hw["threads"] or m.cores
    if device == "cpu":  # DDP on CPU: the processes share the cores
        threads = max(1, threads // world)
    compile_, assumed_mfu = choose_compile(hw["compile"], device), ASSUMED_MFU
    choice = calibrated(cfg, hw, threads, run_seconds(cfg, step_s), cpu_choice)
    if choice:
        precision, compile_, precision_reason = choice["precision"], choice["compile"], describe(choice)
        if choice["seconds"]:  # measured: the time estimate from the winner's own steps
            step_s, assumed_mfu = measured_step_seconds(choice, fit.micro * fit.accum * mc.context_length), None
        shape["precision"] = precision
        est = estimate_memory(micro_batch=max(fit.micro, 1), activation_checkpointing=fit.checkpointing, **shape)
    return Plan(
        preset=hw["name"],
        model=mc.name,
        preset_reason=preset_reason,
        device=device,
        device_name=gpu.name if gpu else "",
        devices=int(hw["devices"]),
        world_size=world,
        ddp_backend=hw["ddp_backend"],
        precision=precision,
        precision_reason=precision_reason,
        grad_scaler=precision == "fp16",
        tf32=tf32,
        cudnn_benchmark=bool(hw["cudnn_benchmark"]) and device == "cuda",
        alloc_conf=hw["alloc_conf"] if device == "cuda" else "",
        compile=compile_,
        compile_mode=hw["compile_mode"],
        threads=threads,
        num_workers=hw["num_workers"],
        pin_memory=bool(hw["pin_memory"]) and device == "cuda",
        persistent_workers=bool(hw["persistent_workers"]) and hw["num_workers"] > 0,
        prefetch_factor=hw["prefetch_factor"] if hw["num_workers"] > 0 else None,
        micro_batch=fit.micro,
        accumulation=fit.accum,
        effective_batch=fit.effective,
        target_effective_batch=int(hw["effective_batch"]),
        batch_reason=fit.reason,
        activation_checkpointing=fit.checkpointing,
        context_length=mc.context_length,
        lr_scaling=o.lr_scaling,
        base_lr=o.lr,
        base_batch=o.base_batch,
        lr=scaled_lr(o.lr, o.base_batch, fit.effective, o.lr_scaling),
        lr_source=lr_source(cfg),
        muon_lr=o.muon_lr if o.name == "muon" else None,
        # One kernel over all tensors; on this 2-core CPU AdamW's step for the
        # small model took 43 ms fused vs 166 ms in the default per-tensor loop.
        fused_optimizer=o.fused if o.fused is not None else device in ("cuda", "cpu"),
        params=n,
        memory_gb=round(memory_gb, 1),
        estimate_gb=round(est.gb(), 2),
        estimate_parts_gb={k: round(v / GiB, 3) for k, v in asdict(est).items() if k != "total"},
        estimate_checkpointed_gb=round(ckpt_gb, 2) if show_ckpt else None,
        estimate_margin=MARGIN,
        headroom_gb=round(memory_gb - est.gb(), 2),
        fits=fit.fits,
        refusal=fit.refusal,
        vocab_assumed=DEFAULT_VOCAB,
        peak_tflops_per_device=peak,
        peak_source=peak_source,
        assumed_mfu=assumed_mfu,
        est_step_seconds=round(step_s, 4) if step_s else None,
        est_run_seconds=round(step_s * max_steps, 1) if step_s and max_steps else None,
        est_tokens_per_sec=round(fit.effective * mc.context_length / step_s) if step_s else None,
        notes=notes,
        warnings=warnings,
        loss_chunk=shape["loss_chunk"],
    )


def runnable_plan(cfg, m: Machine, world_size: int | None = None, cpu_choice=None) -> Plan:
    """The plan, refused before any work if it does not fit or the machine
    lacks its device; with hardware.fallback=true, a warning and the closest
    preset instead of the missing device."""
    plan = make_plan(cfg, m, world_size, cpu_choice)
    if not plan.fits:
        raise ConfigError(f"hardware={plan.preset} model={cfg.model.name}: {plan.refusal}")
    have = {"cuda": len(m.gpus), "mps": int(m.mps), "cpu": plan.world_size}[plan.device]
    if have >= plan.devices:
        return plan
    closest = closest_preset(m)[0]
    msg = (
        f"hardware={plan.preset} needs {plan.devices} {plan.device} device(s) but this machine has "
        f"{len(m.gpus)} CUDA GPU(s){' and MPS' if m.mps else ''}; use hardware=auto, hardware={closest}, "
        f"or hardware.fallback=true to run on what exists"
    )
    if not cfg.hardware.fallback:
        raise ConfigError(msg)
    fallback_cfg = OmegaConf.merge(
        cfg, {"hardware": {**{k: None for k in cfg.hardware if k not in ("name", "fallback")}, "name": "auto"}}
    )
    plan = make_plan(fallback_cfg, m, world_size, cpu_choice)
    plan.warnings.append("fallback: " + msg)
    return plan
