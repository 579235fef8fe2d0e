"""Which hardware preset a run takes: the one it names, or for
`hardware=auto` the one closest to the detected machine, with the user's own
`hardware.*` keys on top."""

from __future__ import annotations

from lingmao.config.presets import hardware_preset
from lingmao.plan.machine import Machine


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
    resolved = hardware_preset(name)
    if m.gpus and resolved["device"] == "cuda":
        resolved["devices"] = len(m.gpus)
    resolved.update({k: v for k, v in hw.items() if v is not None and k != "name"})
    return resolved, f"hardware=auto -> {name}: {why}"
