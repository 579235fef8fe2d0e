"""Optimizer parameter groups, optimizers (AdamW; Muon + AdamW), LR scaling
and the warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def warmup_steps(warmup: float, max_steps: int) -> int:
    """`warmup` < 1 is a fraction of the run, >= 1 a step count."""
    return int(warmup * max_steps) if warmup < 1 else int(warmup)


def cosine(progress: float, floor: float) -> float:
    """From 1 at progress 0 to `floor` at progress 1 (and after), the form
    nanoGPT and torchtitan use: floor + (1 - floor) * (1 + cos(pi p)) / 2.
    Clamping a plain cosine at the floor instead would sit flat at it for
    the last ~20% of a run."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def _ramp(done: float, length: float) -> float:
    """Linear warmup: `done` steps or seconds of `length`."""
    return min(1.0, max(done, 1e-3) / length)


@dataclass
class Schedule:
    """The LR as a function of the step and of the training time. Each bound
    the run has (`trainer.max_steps`/epochs, `trainer.max_time`) is a clock
    with its own warmup and cosine; warmup ends on the first clock to finish
    it, and the decay follows the clock furthest along. So the LR reaches the
    floor when the run ends, whichever bound ends it: a 30-minute run with a
    step budget it will not reach ends at the floor at 30 minutes. A
    checkpoint stores the schedule; a resumed run continues on it."""

    peak_lr: float
    warmup: int  # steps
    total_steps: int | None  # None: no step bound
    min_lr_ratio: float
    max_time: float | None = None  # seconds; None: no time bound
    warmup_time: float = 0.0  # seconds of warmup on the time clock

    @classmethod
    def for_run(
        cls, peak_lr: float, warmup: float, total_steps: int | None, min_lr_ratio: float, max_time: float | None = None
    ) -> Schedule:
        by_fraction = warmup < 1
        steps = max(1, warmup_steps(warmup, total_steps)) if total_steps else (0 if by_fraction else int(warmup))
        return cls(
            peak_lr,
            steps,
            total_steps,
            min_lr_ratio,
            max_time or None,
            warmup * max_time if max_time and by_fraction else 0.0,
        )

    def lr(self, step: int, scale: float = 1.0, seconds: float = 0.0, reserved: float = 0.0) -> float:
        """At `step`, after `seconds` of training; `scale`: on_nan=rollback's cuts;
        `reserved`: seconds of max_time outside training (start-up, the final
        eval and checkpoint), where the time clock's cosine ends early."""
        ramps = [_ramp(step + 1, self.warmup)] if self.warmup else []
        if self.warmup_time:
            ramps.append(_ramp(seconds, self.warmup_time))
        decays = []
        if self.total_steps is not None or not self.max_time:
            total = self.total_steps or 10**12
            decays.append(cosine((step - self.warmup) / max(1, total - self.warmup), self.min_lr_ratio))
        if self.max_time:
            w = self.warmup_time
            decays.append(cosine((seconds - w) / max(1e-9, self.max_time - reserved - w), self.min_lr_ratio))
        return self.peak_lr * scale * min(max(ramps, default=1.0), *decays)


def param_groups(model: torch.nn.Module, weight_decay: float, exclude=()) -> list[dict]:
    """Decay only matrices of linear layers: not norms, biases or embeddings
    (the tied head shares the embedding's tensor, so it is not decayed either).
    Tensors in `exclude` (another optimizer's) are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    others = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in others:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MuonAdamW:
    """Muon (Jordan et al. 2024) for the blocks' hidden matrices and AdamW
    for everything else, presented to the engine as one optimizer:
    `param_groups` are the inner optimizers' own group dicts (AdamW's first),
    so setting a group's "lr", GradScaler's unscale_/step and the engine's
    save-settings/load/reapply all reach the optimizer that owns the group.

    Each group carries `lr_ratio`, its LR over the schedule's: the engine sets
    group["lr"] = schedule LR x lr_ratio, so warmup, cosine decay and
    on_nan=rollback's cuts move both optimizers together."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict]:
        # Read through each time: load_state_dict replaces an optimizer's group dicts.
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError(
                "the saved optimizer state is not optim=muon's (Muon + AdamW): it comes from "
                "another optim.name; resume with that optimizer or start fresh (resume=never)"
            )
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


# Muon's fixed settings, the speedrun's: Nesterov momentum and 5 Newton-Schulz
# iterations (enough for the quintic to bring singular values near 1).
MUON_NESTEROV = True
MUON_NS_STEPS = 5
NS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation (Jordan et al. 2024; torch.optim.Muon's quintic
    iteration) of the 2-D `g`, run in `dtype`. In bf16 it is torch's to the bit.
    In fp16 `g` is scaled to spectral norm <= 1 in fp32 first: a clipped
    gradient's entries (1e-6 and below) sit under fp16's subnormals (6e-8),
    while after the scaling every iterate stays bounded (below 65504)."""
    a, b, c = coefficients
    scale_first = dtype == torch.float16
    x = (g / g.norm().clamp(min=eps)).to(dtype) if scale_first else g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    if not scale_first:  # torch's order: cast, transpose, scale
        x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype` (torch
    hard-codes bf16): the plan chooses it by the GPU's compute capability
    (plan.device.newton_schulz_dtype). Same groups, state and state_dict."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def _muon_lr_ratio(adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's: "original" (Keller Jordan's) sqrt(max(1, fan_out /
    fan_in)); Moonshot's "match_rms_adamw" 0.2 sqrt(max dim)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    betas,
    eps: float,
    weight_decay: float,
    fused: bool,
    *,
    name: str = "adamw",
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
    ns_dtype: torch.dtype = torch.bfloat16,
):
    """AdamW over the whole model (`name="adamw"`), or `name="muon"`: Muon at
    `muon_lr` over `model.hidden_matrices()`, its Newton-Schulz in `ns_dtype`,
    and AdamW at `lr` over the rest (embeddings, tied head, norms, biases,
    MoE router). Both LRs are the batch-scaled ones."""
    if name == "adamw":
        return torch.optim.AdamW(
            param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused or None
        )
    if name != "muon":
        raise ValueError(f"optim.name={name!r} is not valid; choose one of: adamw, muon")
    matrices = model.hidden_matrices()
    adamw = torch.optim.AdamW(
        [{**g, "lr_ratio": 1.0} for g in param_groups(model, weight_decay, exclude=matrices)],
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        fused=fused or None,
    )
    # adjust_lr_fn="original" is Keller Jordan's: the orthogonalised step has
    # spectral norm muon_lr * sqrt(max(1, fan_out/fan_in)), set by a matrix's
    # aspect ratio and not its width, so the speedrun's 0.02 carries across
    # model sizes. (Moonshot's "match_rms_adamw" would reuse AdamW's LR instead,
    # which here is tuned per model size and, at 6e-4 for medium, far below
    # what Muon wants.)
    muon = Muon(
        [{"params": matrices, "lr_ratio": muon_lr / lr}],
        ns_dtype=ns_dtype,
        lr=muon_lr,
        weight_decay=muon_weight_decay,
        momentum=muon_momentum,
        nesterov=MUON_NESTEROV,
        ns_steps=MUON_NS_STEPS,
        adjust_lr_fn="original",
    )
    return MuonAdamW(adamw, muon)


def make_optimizer(model: torch.nn.Module, o, plan):
    """The run's optimizer from its `optim` config `o`: AdamW at the plan's
    batch-scaled LR; Muon at `o.muon_lr` as it is. The batch-size rules
    (sqrt, linear) are AdamW's; Muon's orthogonalised update has a spectral
    norm set by its LR alone, and the speedrun setting it comes from uses
    0.02 across batch sizes (not measured here beyond batch 16). Newton-Schulz
    runs in the plan's `muon_ns_dtype`."""
    return build_optimizer(
        model,
        plan.lr,
        o.betas,
        o.eps,
        o.weight_decay,
        plan.fused_optimizer,
        name=o.name,
        muon_lr=o.muon_lr,
        muon_momentum=o.muon_momentum,
        muon_weight_decay=o.muon_weight_decay,
        ns_dtype=NS_DTYPES[plan.muon_ns_dtype or "bf16"],
    )


def set_lr(optimizer, lr: float) -> None:
    """The schedule's LR into every group, each at its own `lr_ratio` (Muon's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
