"""`plan=true`'s text: a FITS / DOES NOT FIT headline, then the decisions in
words, one per line; the full record is Plan.as_dict() (logged as plan.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lingmao.plan import Plan


def short(x: float) -> str:
    """2 significant digits, exponent without padding: 7.071e-05 -> '7.1e-5', 0.0002 -> '2e-4'."""
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def lr_rule(p: Plan) -> str:
    """The LR with where it came from and its rule, e.g. '1e-3 (optim.lr) x sqrt(128/32) = 2e-3';
    with Muon, its own LR first."""
    if p.lr_scaling == "none" or p.effective_batch == p.base_batch:
        adamw = f"{short(p.lr)} ({p.lr_source}; optim.lr_scaling={p.lr_scaling}, effective batch {p.effective_batch})"
    else:
        ratio = f"{p.effective_batch}/{p.base_batch}"
        factor = f"sqrt({ratio})" if p.lr_scaling == "sqrt" else f"({ratio})"
        adamw = f"{short(p.base_lr)} ({p.lr_source}) x {factor} = {short(p.lr)}"
    if p.muon_lr is None:
        return adamw
    return f"Muon {short(p.muon_lr)} (optim.muon_lr) for the blocks' matrices, AdamW {adamw} for the rest"


def optimizer_groups(p: Plan) -> str:
    """What trains which parameters: with optim=muon, Muon the blocks' matrices
    (most of the parameters) and AdamW the rest; else AdamW all of them."""
    fused = "fused" if p.fused_optimizer else "not fused"
    if p.muon_lr is None:
        return f"AdamW at {short(p.lr)}, {fused}, for every parameter ({p.params / 1e6:.1f}M)"
    share, rest = p.muon_params / p.params, p.params - p.muon_params
    return (
        f"Muon at {short(p.muon_lr)} for the blocks' matrices ({p.muon_params / 1e6:.1f}M, {share:.0%} of the "
        f"parameters; Newton-Schulz in {p.muon_ns_dtype}); AdamW at {short(p.lr)}, {fused}, "
        f"for the embeddings, tied head, norms and biases ({rest / 1e6:.1f}M)"
    )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _headline(p: Plan) -> str:
    memory = f"~{p.estimate_gb:.1f} GB (±{p.estimate_margin:.0%}) of {p.memory_gb:g} GB per device"
    if p.fits:
        return f"FITS  hardware={p.preset} model={p.model}: {memory}"
    return f"DOES NOT FIT  hardware={p.preset} model={p.model}: {p.refusal}"


def _rows(p: Plan) -> list[tuple[str, str]]:
    where = f"{p.world_size} x {p.device}" + (f" ({p.device_name})" if p.device_name else "")
    if p.world_size > 1:
        where += f", DDP over {p.ddp_backend}"
    split = (
        f"micro-batch {p.micro_batch} x accumulation {p.accumulation} x {p.world_size} device(s) = "
        f"{p.effective_batch}"
        + (
            " (hardware.effective_batch)"
            if p.effective_batch == p.target_effective_batch
            else f" (hardware.effective_batch is {p.target_effective_batch})"
        )
    )
    how = f"{p.precision}{' + compile' if p.compile and p.device == 'cpu' else ''}: {p.precision_reason}"
    rows = [
        ("preset", p.preset_reason),
        ("devices", where),
        ("precision", how),
        ("batch", split),
        ("lr", lr_rule(p)),
        ("optimizer", optimizer_groups(p)),
        (
            "model",
            f"{p.params / 1e6:.1f}M parameters, context {p.context_length}"
            + (", activation checkpointing" if p.activation_checkpointing else ""),
        ),
    ]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in p.estimate_parts_gb.items() if v)
    rows.append(("memory", f"{p.estimate_gb:.2f} GB: {parts}"))
    if p.estimate_checkpointed_gb is not None and not p.activation_checkpointing:
        rows.append(("checkpointed", f"{p.estimate_checkpointed_gb:.2f} GB with activation checkpointing"))
    if p.peak_tflops_per_device:
        peak = f"{p.peak_tflops_per_device:g} TFLOPS per device ({p.peak_source})"
    else:
        peak = p.peak_source
    rows.append(("peak", peak))
    if p.est_step_seconds:
        t = f"~{duration(p.est_step_seconds)} per step " + (
            f"at an assumed {p.assumed_mfu:.0%} MFU" if p.assumed_mfu else "as calibrated"
        )
        if p.est_run_seconds:
            t += f"; the run ~{duration(p.est_run_seconds)}"
        rows.append(("time", t))
    if p.device == "cpu":
        rows.append(("threads", str(p.threads)))
    if p.device == "cuda":
        rows.append(
            (
                "cuda",
                f"compile {'on (' + p.compile_mode + ')' if p.compile else 'off'}, "
                f"tf32 {'on' if p.tf32 else 'off'}" + (f", allocator {p.alloc_conf}" if p.alloc_conf else ""),
            )
        )
    rows.append(("data loader", f"{p.num_workers} workers" + (", pinned memory" if p.pin_memory else "")))
    return rows


def render(p: Plan) -> str:
    rows = _rows(p)
    width = max(len(k) for k, _ in rows)
    lines = [_headline(p)] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"  warning: {w}" for w in p.warnings]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)
