"""Optimizer parameter groups, LR scaling and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch


def scaled_lr(lr: float, base_batch: int, effective_batch: int, rule: str) -> float:
    """LR for `effective_batch` given `lr` at `base_batch`. Seed 000: sqrt
    (5e-5 at 16 -> 1e-4 at 64); seed 003 also names linear (Goyal et al. 2017)."""
    ratio = effective_batch / base_batch
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    if rule == "none":
        return lr
    raise ValueError(f"optim.lr_scaling={rule!r}: choose sqrt, linear or none")


def warmup_steps(warmup: float, max_steps: int) -> int:
    """`warmup` < 1 is a fraction of the run (seed 000: 10%), >= 1 a step count."""
    return int(warmup * max_steps) if warmup < 1 else int(warmup)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Seed 000's lr_lambda: linear warmup, then cosine decay, never below `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(floor, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear layers: not norms, biases or embeddings
    (the tied head shares the embedding's tensor, so it is not decayed either)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, betas, eps: float, weight_decay: float,
                    fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)
