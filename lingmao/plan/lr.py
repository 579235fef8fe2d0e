"""The LR a plan gives a run: the configured rate, scaled to the effective
batch by the chosen rule, and where the rate came from."""

from __future__ import annotations

import math

from omegaconf import OmegaConf


def scaled_lr(lr: float, base_batch: int, effective_batch: int, rule: str) -> float:
    """LR for `effective_batch` given `lr` at `base_batch`: sqrt (1e-3 at 32
    -> 2e-3 at 128), linear (Goyal et al. 2017) or none."""
    ratio = effective_batch / base_batch
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    if rule == "none":
        return lr
    raise ValueError(f"optim.lr_scaling={rule!r}: choose sqrt, linear or none")


def lr_source(cfg) -> str:
    """optim.lr_by_size.<model> where optim.lr was left to the size's default, else optim.lr."""
    default = OmegaConf.is_config(cfg.optim) and OmegaConf.is_interpolation(cfg.optim, "lr")
    return f"optim.lr_by_size.{cfg.model.name}" if default else "optim.lr"
