"""What would fit when nothing does: a shorter context, a smaller model
size, or a smaller micro-batch with the same effective batch. Only a plan
that does not fit asks, so only a refusal pays for the search."""

from __future__ import annotations

from lingmao.config.presets import model_presets
from lingmao.plan.estimate import model_shape
from lingmao.plan.memory import MARGIN, estimate_memory, fit_micro_batch, fits

MIN_CONTEXT = 64  # the shortest context `alternatives` suggests


def alternatives(shape: dict, budget: int) -> list[str]:
    """What would fit at micro-batch 1 with activation checkpointing: a shorter
    context, a smaller model size."""
    out = []
    ctx = shape["context_length"] // 2
    while ctx >= MIN_CONTEXT and not fits({**shape, "context_length": ctx}, budget, 1, True):
        ctx //= 2
    if ctx >= MIN_CONTEXT:
        out.append(f"model.context_length={ctx}")
    common = {k: shape[k] for k in ("vocab_size", "precision", "device", "ddp", "optimizer")}
    common["vocab"] = common.pop("vocab_size")
    size = estimate_memory(micro_batch=1, **shape).params
    smaller = []
    for name, mc in model_presets():
        other = model_shape(mc, **common)
        params = estimate_memory(micro_batch=1, **other).params
        if params < size:
            smaller.append((params, name, other))
    for _, name, other in sorted(smaller, key=lambda s: s[0], reverse=True):
        if fits(other, budget, 1, True):
            best = fit_micro_batch(budget, headroom=1.0, max_batch=64, **other)
            out.append(
                f"model={name}"
                + f" (context {other['context_length']}, "
                + (f"micro-batch up to {best} without checkpointing)" if best else "with activation checkpointing)")
            )
            break
    return out


def refusal(shape: dict, budget: int, memory_gb: float) -> str:
    gb = estimate_memory(micro_batch=1, activation_checkpointing=True, **shape).gb()
    alts = alternatives(shape, budget)
    return (
        f"even micro-batch 1 with activation checkpointing needs ~{gb:.1f} GB (±{MARGIN:.0%}) of "
        f"{memory_gb:.0f} GB; "
        + ("would fit: " + ", or ".join(alts) if alts else "nothing smaller fits: use a device with more memory")
    )


def suggest_split(shape: dict, budget: int, micro: int, accum: int, world: int, memory_gb: float) -> str:
    """For a fixed micro-batch that does not fit: a smaller one with the same effective batch."""
    plain = estimate_memory(micro_batch=micro, **shape).gb()
    ckpt = estimate_memory(micro_batch=micro, activation_checkpointing=True, **shape).gb()
    head = (
        f"micro-batch {micro} needs ~{plain:.1f} GB (±{MARGIN:.0%}) of {memory_gb:.0f} GB "
        f"(~{ckpt:.1f} GB with activation checkpointing)"
    )
    per = micro * accum
    for ckpt_on in (False, True):
        best = fit_micro_batch(budget, headroom=1.0, max_batch=micro, activation_checkpointing=ckpt_on, **shape)
        if best:
            m = max(d for d in range(1, best + 1) if per % d == 0)
            extra = " hardware.activation_checkpointing=true" if ckpt_on else ""
            return (
                f"{head}: use hardware.batch={m} hardware.accumulation={per // m}{extra} "
                f"({m} x {per // m} x {world} = {per * world}, the same effective batch), or hardware.batch=auto"
            )
    return f"{head}; {refusal(shape, budget, memory_gb)}"
