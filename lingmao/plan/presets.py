"""Which hardware preset a run takes: the one it names, or for
`hardware=auto` the one closest to the detected machine, with the user's own
`hardware.*` keys on top."""

from __future__ import annotations

from lingmao.config.presets import hardware_preset
from lingmao.plan.machine import Machine

# Ampere+ GPUs with this much memory or more take the datacenter preset: from
# 40 GB the default model (small) takes the preset's whole 256-sample batch in
# one micro-batch (the estimate, its margin kept, fits 306 at 40 GB, 179 at
# 24 GB), so a step needs no accumulation; smaller cards keep the desktop
# presets' 32-sample steps.
DATACENTER_GB = 40
DESKTOP_GB = 20  # below: the 12 GB class (rtx3060); from here: the 24 GB class (rtx4090)


def closest_preset(m: Machine) -> tuple[str, str]:
    """The preset that fits the machine best, and why. On CUDA the plan then
    uses the detected count, name and memory, not the preset's."""
    if m.gpus:
        g, n = m.gpu, len(m.gpus)
        what = f"{n} x {g.name}, {g.memory_gb:.0f} GB, compute capability {g.compute_capability}"
        if g.compute_capability < 8.0:
            return ("t4x2" if n >= 2 else "t4"), f"{what} (< 8.0: no bf16, fp16 + GradScaler)"
        if g.memory_gb >= DATACENTER_GB:
            return "datacenter", f"{what} (>= 8.0 and >= {DATACENTER_GB} GB)"
        big = g.memory_gb >= DESKTOP_GB
        return ("rtx4090" if big else "rtx3060"), f"{what} ({'>=' if big else '<'} {DESKTOP_GB} GB)"
    if m.mps:
        return "m1", "Apple MPS device"
    return "cpu", f"no GPU; {m.cores} cores"


def resolve_hardware(hw: dict, m: Machine) -> tuple[dict, str]:
    """Fill `auto` from the closest preset; keys the user set still win. On a
    CUDA machine `auto` takes the detected GPU count for `devices`."""
    if hw["name"] != "auto":
        return hw, f"hardware={hw['name']} (chosen)"
    name, why = closest_preset(m)
    resolved = hardware_preset(name)
    if m.gpus and resolved["device"] == "cuda":
        resolved["devices"] = len(m.gpus)
    resolved.update({k: v for k, v in hw.items() if v is not None and k != "name"})
    return resolved, f"hardware=auto -> {name}: {why}"
