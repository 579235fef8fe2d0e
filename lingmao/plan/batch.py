"""Splitting an effective batch into micro-batch x accumulation x devices
that fits in memory, and saying what would fit when nothing does.

Pure arithmetic over lingmao.plan.estimate; the plan calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from lingmao.config.rules import CONF_DIR
from lingmao.config.schema import ModelConfig
from lingmao.plan.estimate import MARGIN, GiB, estimate_memory, fit_micro_batch

# Within this share of the target when the device count does not divide it.
INEXACT_TOLERANCE = 0.10
MIN_CONTEXT = 64


@dataclass
class Fit:
    micro: int
    accum: int
    effective: int
    checkpointing: bool
    fits: bool
    note: str = ""  # how the split was chosen, for the plan's notes
    reason: str = ""  # the same, short, for Plan.batch_reason
    refusal: str = ""  # why it does not fit and what would


# Tokens of logits the training loss takes at a time (model.token_loss_sum):
# the fp32 logits of a whole micro-batch (tokens x 13.5k, a third of the small
# model's training memory at batch 16) never exist at once, for one more head
# matmul per token in backward (python -m lingmao.bench suite=cpu parts=loss).
LOSS_CHUNK = 1024


def model_shape(mc, *, vocab: int, precision: str, device: str, ddp: bool) -> dict:
    """estimate_memory's keyword arguments for the model node `mc`."""
    return dict(
        d_model=mc.d_model,
        n_heads=mc.n_heads,
        n_layers=mc.n_layers,
        context_length=mc.context_length,
        vocab_size=vocab,
        mlp_ratio=mc.mlp_ratio,
        precision=precision,
        dropout=mc.dropout,
        device=device,
        rotary=bool(mc.rotary),
        qk_norm=bool(mc.qk_norm),
        moe_experts=mc.moe.experts,
        moe_top_k=mc.moe.top_k,
        vocab_multiple=mc.vocab_multiple,
        ddp=ddp,
        loss_chunk=LOSS_CHUNK,
    )


def _fits(shape: dict, budget: int, micro: int, ckpt: bool) -> bool:
    return estimate_memory(micro_batch=micro, activation_checkpointing=ckpt, **shape).total <= budget


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
            if _fits(shape, budget, preferred, ckpt):
                return Fit(preferred, target // (preferred * world), target, ckpt, True)
            continue
        best = fit_micro_batch(budget, headroom=1.0, max_batch=preferred, activation_checkpointing=ckpt, **shape)
        if best == 0:
            continue
        micro, accum = split(target, world, best)
        effective = micro * accum * world
        gb = estimate_memory(micro_batch=micro, activation_checkpointing=ckpt, **shape).gb()
        why = f"the largest up to the preferred {preferred} that fits (~{gb:.1f} GB)" + (
            f" and divides the per-device batch {target // world}" if effective == target else ""
        )
        note = f"micro-batch {micro} x accumulation {accum} x {world} device(s) = {effective}: {why}" + (
            "" if effective == target else f"; not the target {target}, which {world} processes do not divide"
        )
        return Fit(micro, accum, effective, ckpt, True, note=note, reason=f"micro-batch {micro}: {why}")
    micro = preferred if exact_micro else 1
    return Fit(micro, max(1, target // (micro * world)), target, False, False)


def model_sizes() -> list[tuple[str, ModelConfig]]:
    """conf/model's sizes, their yaml over the schema's defaults."""
    out = []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
        out.append((path.stem, node))
    return out


def alternatives(shape: dict, budget: int) -> list[str]:
    """What would fit at micro-batch 1 with activation checkpointing: a shorter
    context, a smaller model size."""
    out = []
    ctx = shape["context_length"] // 2
    while ctx >= MIN_CONTEXT and not _fits({**shape, "context_length": ctx}, budget, 1, True):
        ctx //= 2
    if ctx >= MIN_CONTEXT:
        out.append(f"model.context_length={ctx}")
    common = {k: shape[k] for k in ("vocab_size", "precision", "device", "ddp")}
    common["vocab"] = common.pop("vocab_size")
    size = estimate_memory(micro_batch=1, **shape).params
    smaller = []
    for name, mc in model_sizes():
        other = model_shape(mc, **common)
        params = estimate_memory(micro_batch=1, **other).params
        if params < size:
            smaller.append((params, name, other))
    for _, name, other in sorted(smaller, key=lambda s: s[0], reverse=True):
        if _fits(other, budget, 1, True):
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


def budget_bytes(memory_gb: float) -> int:
    """What the estimate may use of `memory_gb`: its error margin kept free."""
    return int(memory_gb * GiB / (1 + MARGIN))
