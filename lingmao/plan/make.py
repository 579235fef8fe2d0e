"""make_plan: (config, machine) -> Plan, a pure function.

One pass, each decision taken once by the module that owns it: the preset
(plan.presets), the device (plan.device), the batch and its memory
(plan.batch, plan.estimate), the LR (plan.lr), the time estimate. A CPU
calibration's answer comes in as data (`cpu_choice`); measuring it is the
engine's (lingmao.train.calibrate).
"""

from __future__ import annotations

from dataclasses import asdict

from omegaconf import OmegaConf

from lingmao.config import ConfigError
from lingmao.plan import Plan
from lingmao.plan.batch import Fit, plan_batch
from lingmao.plan.calibration import measured_step_seconds
from lingmao.plan.device import Where, where
from lingmao.plan.estimate import model_shape, step_seconds
from lingmao.plan.lr import lr_source, scaled_lr
from lingmao.plan.machine import Machine
from lingmao.plan.memory import MARGIN, GiB
from lingmao.plan.presets import closest_preset, resolve_hardware

# Vocabulary the estimates assume: the default corpus' (chinese-poetry 2.0.1,
# simplified, measured). The plan never reads the data, so it cannot know yours.
DEFAULT_VOCAB = 13563
ASSUMED_MFU = 0.4


def make_plan(cfg, m: Machine, world_size: int | None = None, cpu_choice: dict | None = None) -> Plan:
    """`cfg` is the composed RunConfig (DictConfig or dataclass). `world_size`:
    the processes of a launcher that set WORLD_SIZE (torchrun across nodes),
    when not the preset's `devices` on this one machine. `cpu_choice`: a CPU
    calibration's answer (plan.calibration.choose) for precision and compile
    `auto`; without one, `auto` on CPU means fp32 eager."""
    hw, preset_reason = _hardware(cfg, m)
    w = where(hw, m, world_size, cpu_choice)
    shape = model_shape(
        cfg.model,
        vocab=DEFAULT_VOCAB,
        precision=w.precision,
        device=w.device,
        ddp=w.world > 1,
        optimizer=cfg.optim.name,
    )
    fit, notes, warnings = plan_batch(hw, shape, w.memory_gb, w.world)
    if fit.fits and fit.checkpointing and not hw["activation_checkpointing"]:
        notes.append(f"activation checkpointing on: without it even micro-batch 1 does not fit in {w.memory_gb:.0f} GB")
    return Plan(
        preset=hw["name"],
        model=cfg.model.name,
        preset_reason=preset_reason,
        precision=w.precision,
        precision_reason=w.precision_reason,
        compile=w.compile,
        cpu_candidates=w.cpu_candidates,
        peak_tflops_per_device=w.peak,
        peak_source=w.peak_source,
        notes=notes,
        warnings=warnings,
        loss_chunk=shape["loss_chunk"],
        **_device_fields(hw, w),
        **_batch_fields(hw, fit, cfg.model.context_length),
        **_lr_fields(cfg, fit.effective, w.device),
        **_muon_fields(cfg, fit, w),
        **_memory_fields(fit, w.memory_gb),
        **_time_fields(cfg, shape, fit, w.peak, cpu_choice if w.cpu_candidates else None),
    )


def _hardware(cfg, m: Machine) -> tuple[dict, str]:
    """The resolved hardware section (`auto` filled from the closest preset), and why that preset."""
    hw_in = OmegaConf.to_container(cfg.hardware) if OmegaConf.is_config(cfg.hardware) else asdict(cfg.hardware)
    hw, reason = resolve_hardware(hw_in, m)
    missing = [k for k, v in hw.items() if v is None and k not in ("prefetch_factor",)]
    if missing:
        raise ConfigError(f"hardware={hw['name']} leaves {', '.join(missing)} unset")
    return hw, reason


def _device_fields(hw: dict, where: Where) -> dict:
    cuda = where.device == "cuda"
    return dict(
        device=where.device,
        device_name=where.gpu.name if where.gpu else "",
        devices=int(hw["devices"]),
        world_size=where.world,
        ddp_backend=hw["ddp_backend"],
        grad_scaler=where.precision == "fp16",
        tf32=where.tf32,
        cudnn_benchmark=bool(hw["cudnn_benchmark"]) and cuda,
        alloc_conf=hw["alloc_conf"] if cuda else "",
        compile_mode=hw["compile_mode"],
        threads=where.threads,
        num_workers=hw["num_workers"],
        pin_memory=bool(hw["pin_memory"]) and cuda,
        persistent_workers=bool(hw["persistent_workers"]) and hw["num_workers"] > 0,
        prefetch_factor=hw["prefetch_factor"] if hw["num_workers"] > 0 else None,
        memory_gb=round(where.memory_gb, 1),
    )


def _batch_fields(hw: dict, fit: Fit, context_length: int) -> dict:
    return dict(
        micro_batch=fit.micro,
        accumulation=fit.accum,
        effective_batch=fit.effective,
        target_effective_batch=int(hw["effective_batch"]),
        batch_reason=fit.reason,
        activation_checkpointing=fit.checkpointing,
        context_length=context_length,
        fits=fit.fits,
        refusal=fit.refusal,
    )


def _lr_fields(cfg, effective_batch: int, device: str) -> dict:
    o = cfg.optim
    return dict(
        lr_scaling=o.lr_scaling,
        base_lr=o.lr,
        base_batch=o.base_batch,
        lr=scaled_lr(o.lr, o.base_batch, effective_batch, o.lr_scaling),
        lr_source=lr_source(cfg),
        muon_lr=o.muon_lr if o.name == "muon" else None,
        # One kernel over all tensors; on this 2-core CPU AdamW's step for the
        # small model took 43 ms fused vs 166 ms in the default per-tensor loop.
        fused_optimizer=o.fused if o.fused is not None else device in ("cuda", "cpu"),
    )


def _muon_fields(cfg, fit: Fit, where: Where) -> dict:
    """optim=muon: what Muon trains (the blocks' matrices, as the estimate
    counted them) and its Newton-Schulz dtype."""
    muon = cfg.optim.name == "muon"
    return dict(muon_ns_dtype=where.ns_dtype if muon else None, muon_params=fit.estimate.muon_params)


def _memory_fields(fit: Fit, memory_gb: float) -> dict:
    est = fit.estimate
    checkpointed = fit.estimate if fit.checkpointing else fit.checkpointed
    return dict(
        params=est.n_params,
        estimate_gb=round(est.gb(), 2),
        estimate_parts_gb={k: round(v / GiB, 3) for k, v in asdict(est).items() if k not in ("total", "muon_params")},
        estimate_checkpointed_gb=round(checkpointed.gb(), 2) if checkpointed else None,
        estimate_margin=MARGIN,
        headroom_gb=round(memory_gb - est.gb(), 2),
        vocab_assumed=DEFAULT_VOCAB,
    )


def _time_fields(cfg, shape: dict, fit: Fit, peak: float | None, cpu_choice: dict | None) -> dict:
    """Step and run time: from a CPU calibration's measurement where there is
    one, else the FLOPs at ASSUMED_MFU of the peak."""
    tokens = fit.micro * fit.accum * cfg.model.context_length
    if cpu_choice and cpu_choice["seconds"]:  # measured: the time estimate from the winner's own steps
        step_s, mfu = measured_step_seconds(cpu_choice, tokens), None
    else:
        n = fit.estimate.n_params
        step_s, mfu = step_seconds(shape, n, tokens, fit.checkpointing, peak, ASSUMED_MFU), ASSUMED_MFU
    max_steps = cfg.trainer.max_steps
    return dict(
        assumed_mfu=mfu,
        est_step_seconds=round(step_s, 4) if step_s else None,
        est_run_seconds=round(step_s * max_steps, 1) if step_s and max_steps else None,
        est_tokens_per_sec=round(fit.effective * cfg.model.context_length / step_s) if step_s else None,
    )


def runnable_plan(
    cfg, m: Machine, world_size: int | None = None, cpu_choice: dict | None = None, typed: tuple[str, ...] = ()
) -> Plan:
    """The plan, refused before any work if it does not fit or the machine
    lacks its device; with hardware.fallback=true, a warning and the closest
    preset instead of the missing device. The hardware.* keys the user set
    (`typed`: the command line's; and any value unlike the named preset's)
    still win there, as they do over `auto`, but for those that describe the
    missing device: the warning names both."""
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
    from lingmao.config.presets import hardware_preset

    preset = hardware_preset(plan.preset)
    hw = OmegaConf.to_container(cfg.hardware) if OmegaConf.is_config(cfg.hardware) else asdict(cfg.hardware)
    given = {
        k: v
        for k, v in hw.items()
        if k not in ("name", "fallback") and v is not None and (f"hardware.{k}" in typed or v != preset.get(k))
    }
    missing_device = ("device", "devices", "memory_gb", "peak_tflops", "compute_capability")
    kept = {k: v for k, v in given.items() if k not in missing_device}
    fallback_cfg = OmegaConf.merge(
        cfg, {"hardware": {**{k: None for k in hw if k not in ("name", "fallback")}, **kept, "name": "auto"}}
    )
    plan = make_plan(fallback_cfg, m, world_size, cpu_choice)

    def said(keys) -> str:
        shown = {
            k: str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else v
            for k, v in given.items()
        }
        return ", ".join(f"hardware.{k}={shown[k]}" for k in sorted(keys))

    dropped = sorted(set(given) - set(kept))
    plan.warnings.append(
        "fallback: "
        + msg
        + (f"; kept as given: {said(kept)}" if kept else "")
        + (f"; dropped: {said(dropped)} (it describes the missing device)" if dropped else "")
    )
    return plan
