"""Splitting an effective batch into micro-batch x accumulation x devices
that fits in memory. A preset is a target: the effective batch it wants and
the micro-batch it prefers; the fit takes the largest micro-batch up to the
preferred one that fits and divides the per-device batch.

Pure arithmetic over lingmao.plan.estimate. A Fit carries the estimate it
was chosen by, so nothing downstream estimates the same split again.
"""

from __future__ import annotations

from dataclasses import dataclass

from lingmao.config.presets import HARDWARE, hardware_preset
from lingmao.plan.advice import refusal, suggest_split
from lingmao.plan.memory import MARGIN, GiB, MemoryEstimate, estimate, fit_micro_batch

# Within this share of the target when the device count does not divide it.
INEXACT_TOLERANCE = 0.10


@dataclass
class Fit:
    micro: int
    accum: int
    effective: int
    checkpointing: bool
    fits: bool
    estimate: MemoryEstimate  # of this split as planned (with checkpointing when it is on)
    checkpointed: MemoryEstimate | None = None  # with checkpointing, where that was considered and is not on
    note: str = ""  # how the split was chosen, for the plan's notes
    reason: str = ""  # the same, short, for Plan.batch_reason
    refusal: str = ""  # why it does not fit and what would


def split(target: int, world: int, best: int) -> tuple[int, int]:
    """(micro, accumulation) with micro <= best: exactly `target` when the
    per-device batch is whole (the largest divisor of it up to `best`), else
    the largest micro-batch that lands within INEXACT_TOLERANCE of it."""
    per, rem = divmod(target, world)
    if rem == 0 and per >= 1:
        micro = max(m for m in range(1, min(best, per) + 1) if per % m == 0)
        return micro, per // micro
    closest = (1, max(1, round(target / world)))
    for micro in range(min(best, max(per, 1)), 0, -1):
        accum = max(1, round(target / (micro * world)))
        if abs(micro * accum * world - target) <= INEXACT_TOLERANCE * target:
            return micro, accum
    return closest


def fit_batch(
    shape: dict, budget: int, target: int, world: int, preferred: int, forced_ckpt: bool, exact_micro: bool = False
) -> Fit:
    """The split of `target` samples over `world` devices: the largest
    micro-batch up to `preferred` that fits in `budget` bytes, without
    activation checkpointing unless that is what makes it fit (or it is
    forced). `exact_micro`: the micro-batch is `preferred` as given."""
    for ckpt in (True,) if forced_ckpt else (False, True):
        if exact_micro:
            est = estimate(shape, preferred, ckpt)
            if est.total <= budget:
                return Fit(preferred, target // (preferred * world), target, ckpt, True, est)
            continue
        best = fit_micro_batch(budget, headroom=1.0, max_batch=preferred, activation_checkpointing=ckpt, **shape)
        if best:
            return _split_fit(shape, target, world, preferred, best, ckpt)
    micro = preferred if exact_micro else 1
    plain, ckpt = estimate(shape, micro, False), estimate(shape, micro, True)
    return Fit(micro, max(1, target // (micro * world)), target, False, False, plain, checkpointed=ckpt)


def _split_fit(shape: dict, target: int, world: int, preferred: int, best: int, ckpt: bool) -> Fit:
    micro, accum = split(target, world, best)
    effective = micro * accum * world
    est = estimate(shape, micro, ckpt)
    why = f"the largest up to the preferred {preferred} that fits (~{est.gb():.1f} GB)" + (
        f" and divides the per-device batch {target // world}" if effective == target else ""
    )
    note = f"micro-batch {micro} x accumulation {accum} x {world} device(s) = {effective}: {why}" + (
        "" if effective == target else f"; not the target {target}, which {world} processes do not divide"
    )
    return Fit(micro, accum, effective, ckpt, True, est, note=note, reason=f"micro-batch {micro}: {why}")


def budget_bytes(memory_gb: float) -> int:
    """What the estimate may use of `memory_gb`: its error margin kept free."""
    return int(memory_gb * GiB / (1 + MARGIN))


def targets(hw: dict) -> tuple[dict, int, list[str], bool]:
    """(the preset, the target effective batch, warnings where the user moved
    off the preset's batch, whether they fixed the split by setting batch or
    accumulation)."""
    preset = hardware_preset(hw["name"]) if hw["name"] in HARDWARE else hw
    target, warnings = int(hw["effective_batch"]), []
    if target != int(preset["effective_batch"]):
        warnings.append(
            f"hardware.effective_batch={target} is not the {hw['name']} preset's {preset['effective_batch']}: "
            f"runs are comparable step by step only at the same effective batch"
        )
    fixed = hw["batch"] != "auto" and (hw["batch"], hw["accumulation"]) != (preset["batch"], preset["accumulation"])
    if not fixed and hw["batch"] == "auto" and hw["accumulation"] != preset["accumulation"]:
        warnings.append(
            f"hardware.accumulation={hw['accumulation']} is ignored with hardware.batch=auto: the plan "
            f"derives it from hardware.effective_batch={target}; set that to change the batch"
        )
    return preset, target, warnings, fixed


def plan_batch(hw: dict, shape: dict, memory_gb: float, world: int) -> tuple[Fit, list[str], list[str]]:
    """(micro-batch, accumulation and checkpointing for this model on this
    device, notes, warnings)."""
    preset, target, warnings, fixed = targets(hw)
    budget, forced_ckpt, notes = budget_bytes(memory_gb), bool(hw["activation_checkpointing"]), []
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
        return fit, notes, warnings
    preferred = int(preset["batch"] if hw["batch"] == "auto" else hw["batch"])
    fit = fit_batch(shape, budget, target, world, preferred, forced_ckpt)
    if not fit.fits:
        fit.refusal = refusal(shape, budget, memory_gb)
    if fit.effective != target:
        warnings.append(fit.note)
    elif fit.fits and fit.micro < preferred:  # the plan changed the preset's split: say so
        notes.append(fit.note)
    return fit, notes, warnings
