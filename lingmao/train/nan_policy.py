"""What a non-finite step does (`trainer.on_nan`): stop, skip it, or roll
back to the last checkpoint with a lower LR."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# on_nan=skip gives up after this many non-finite steps in a row: the weights
# themselves are then broken, and skipping would spin without end.
MAX_SKIPS_IN_A_ROW = 10
# on_nan=rollback gives up after this many rollbacks with no checkpoint written in between.
MAX_ROLLBACKS = 3
AMP_ADVICE = (
    "For NaN under mixed precision try, in this order: lower optim.lr, lower hardware.batch, "
    "raise hardware.accumulation, and only as a last resort hardware.precision=fp32."
)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient the run could not get past."""


def nonfinite_report(step: int, lr: float, loss: float, grad_norm: float, scaler, raw, optimizer) -> str:
    """The failing step, its LR and loss scale, and the tensors (by optimizer
    parameter group) whose gradients or weights are non-finite."""
    names = {id(t): n for n, t in raw.named_parameters()}
    scale = f"{scaler.get_scale():g}" if scaler.is_enabled() else "1 (no GradScaler)"
    lines = [
        f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
        f"(loss {loss:.4g}, grad norm {grad_norm:.4g}, lr {lr:.3g}, loss scale {scale})"
    ]
    for i, group in enumerate(optimizer.param_groups):
        bad = [
            f"{'weights' if not torch.isfinite(t).all() else 'grad'} of {names[id(t)]}"
            for t in group["params"]
            if not torch.isfinite(t).all() or (t.grad is not None and not torch.isfinite(t.grad).all())
        ]
        if bad:
            more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
            lines.append(f"  param group {i} (weight_decay {group['weight_decay']:g}): {', '.join(bad[:6])}{more}")
    if len(lines) == 1:
        lines.append("  every gradient and weight is finite: the loss or the norm overflowed")
    return "\n".join(lines)


class NanPolicy:
    """Counts non-finite steps and decides: "skip", "rollback", or raise."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skips_in_a_row = 0
        self.rollbacks = 0  # since the last checkpoint

    def good_step(self) -> None:
        self.skips_in_a_row = 0

    def saved(self) -> None:
        self.rollbacks = 0

    def decide(self, report: str, last_good: Path | None, saved_at: int) -> str:
        if self.policy == "skip" and self.skips_in_a_row < MAX_SKIPS_IN_A_ROW:
            self.skips_in_a_row += 1
            return "skip"
        if self.policy == "rollback" and last_good and self.rollbacks < MAX_ROLLBACKS:
            self.rollbacks += 1
            return "rollback"
        why = {
            "stop": "stopped before this step changed the weights",
            "skip": f"gave up after {MAX_SKIPS_IN_A_ROW} non-finite steps in a row",
            "rollback": f"gave up after {MAX_ROLLBACKS} rollbacks" if last_good else "nothing to roll back to",
        }
        where = (
            f"the last checkpoint, {last_good}, holds step {saved_at}"
            if last_good
            else "no checkpoint was written yet (see checkpoint.every_steps / every_minutes)"
        )
        raise NonFiniteError(f"{report}\ntrainer.on_nan={self.policy}: {why[self.policy]}; {where}. {AMP_ADVICE}")
