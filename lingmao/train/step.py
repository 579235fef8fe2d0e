"""One optimizer step, and the state a run carries from step to step.

A step: `accumulation` micro-batches (each split in `chunks` pieces at
night), forward under the plan's autocast, backward of the token-summed loss
over the whole effective batch's token count, unscale, gradient norm, a
finiteness check every rank agrees on, clip, optimizer and scaler step. The
engine, the benchmark mode and the speedrun race all train through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lingmao.model.gpt import GPT, GPTConfig
from lingmao.plan import Plan
from lingmao.train.backend import autocast, seed_everything
from lingmao.train.distributed import Dist, Parallel, agree
from lingmao.train.optim import make_optimizer, set_lr

# With fp16 a GradScaler skips the steps whose scaled gradients overflow and
# halves its scale; healthy runs do so now and then. A scale below 1 means
# the gradients overflow unscaled: the run has diverged.
MIN_LOSS_SCALE = 1.0


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the tensors."""

    step: int = 0  # optimizer steps applied
    epoch: int = 0
    epoch_windows: int = 0  # windows of `epoch` trained on so far, all ranks together
    lr_scale: float = 1.0  # product of on_nan=rollback's LR cuts
    skipped_steps: int = 0  # non-finite steps dropped by on_nan=skip
    best_val: float = math.inf  # lowest val loss of a scheduled eval (early stopping)
    evals_since_best: int = 0
    best_saved_val: float = math.inf  # lowest val loss of a saved checkpoint (best.pt)
    seconds: float = 0.0  # wall time trained, over every process of the run (trainer.max_time counts it)

    def count_eval(self, val: float, patience: int | None) -> bool:
        """Early stopping: True once `patience` evals in a row brought no improvement."""
        if val < self.best_val:
            self.best_val, self.evals_since_best = val, 0
        else:
            self.evals_since_best += 1
        return patience is not None and self.evals_since_best >= patience


@dataclass
class StepStats:
    loss: torch.Tensor  # per-token mean over the effective batch (this rank's share), on the device
    grad_norm: torch.Tensor
    lr: float
    applied: bool  # False: non-finite, the weights were not touched
    moe: dict = field(default_factory=dict)  # of the last micro-batch


@dataclass
class StepParts:
    """What one training step is built from; `step.step(batches, lr)` runs one."""

    raw: GPT  # the plain model: checkpoints, evals and samples read it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    model: Parallel  # raw as the step runs it: DDP, then compile
    step: TrainStep


def build_step(cfg, plan: Plan, vocab_size: int, device: torch.device, dist: Dist, restore=None) -> StepParts:
    """The one way a training step is built, for the engine, the bench and the
    CPU calibration alike: seed, model, optimizer and GradScaler, then
    `restore(raw, optimizer, scaler)` (a resumed run's checkpoint), then
    DDP and compile around the restored model. Seeding first makes the
    initial weights a function of `cfg.seed` alone."""
    seed_everything(cfg.seed)
    raw = GPT(GPTConfig.from_model_config(cfg.model, vocab_size)).to(device)
    optimizer = make_optimizer(raw, cfg.optim, plan)
    scaler = torch.amp.GradScaler(plan.device, enabled=plan.grad_scaler)
    if restore is not None:
        restore(raw, optimizer, scaler)
    model = Parallel(raw, plan, dist, device)
    return StepParts(raw, optimizer, scaler, model, TrainStep(model, optimizer, scaler, cfg, plan, device, dist.ddp))


class _NoClock:
    def lap(self, phase: str) -> None:
        pass


class TrainStep:
    """Everything one optimizer step touches; `step(batches, lr)` runs one."""

    def __init__(self, model: Parallel, optimizer, scaler, cfg, plan: Plan, device: torch.device, ddp: bool):
        self.model, self.raw, self.optimizer, self.scaler = model, model.raw, optimizer, scaler
        self.plan, self.grad_clip, self.aux_loss_weight = plan, cfg.optim.grad_clip, cfg.model.moe.aux_loss_weight
        self.device, self.ddp = device, ddp

    def step(self, batches, lr: float, chunks: int = 1, clock=None) -> StepStats:
        """One optimizer step over the next `accumulation` batches. `clock`
        (bench): lap("data" | "forward_backward" | "optimizer") after each phase."""
        clock = clock or _NoClock()
        self.optimizer.zero_grad(set_to_none=True)  # those a non-finite step left
        set_lr(self.optimizer, lr)
        accumulation = self.plan.accumulation
        total = torch.zeros((), device=self.device)
        moe = {}
        for micro in range(accumulation):
            x, y = next(batches)
            clock.lap("data")
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            tokens = y.numel() * accumulation  # the effective batch's, on this rank
            for piece, (xc, yc) in enumerate(zip(x.chunk(chunks), y.chunk(chunks))):
                last = micro == accumulation - 1 and piece == chunks - 1
                with self.model.sync_gradients(last):
                    ce, moe = self._loss(xc, yc, tokens, accumulation * chunks)
                total += ce.detach()
            clock.lap("forward_backward")
        applied = self._update(total, lr)
        clock.lap("optimizer")
        return StepStats(total, self._grad_norm, lr, applied, moe)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, tokens: int, pieces: int) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one piece. Token-summed cross-entropy over
        the effective batch's token count, so every token weighs the same
        under accumulation and night-mode splits."""
        with autocast(self.plan):
            if self.plan.loss_chunk:
                ce = self.model(x, targets=y, loss_chunk=self.plan.loss_chunk) / tokens
            else:
                logits = self.model(x)
        if not self.plan.loss_chunk:
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / tokens
        moe = self.raw.moe_stats()
        # Switch Transformer load balancing, one share per piece like the loss
        loss = ce + self.aux_loss_weight * moe["aux_loss"] / pieces if moe else ce
        self.scaler.scale(loss).backward()
        return ce, moe

    def _update(self, loss: torch.Tensor, lr: float) -> bool:
        """Clip and step, unless the step is non-finite on any rank."""
        self.scaler.unscale_(self.optimizer)
        grads = [t.grad for t in self.raw.parameters() if t.grad is not None]
        self._grad_norm = torch.nn.utils.get_total_norm(grads)
        # One host sync per optimizer step: a non-finite step must be caught
        # before it touches the weights. With fp16 an overflowing gradient is
        # the GradScaler's to skip; a non-finite loss is not.
        bad = (
            ~torch.isfinite(loss)
            if self.scaler.is_enabled()
            else ~(torch.isfinite(loss) & torch.isfinite(self._grad_norm))
        )
        (nonfinite,) = agree([bad], self.device, self.ddp)
        scale = self.scaler.get_scale()  # 1.0 without a GradScaler
        if nonfinite:
            # unscale_ ran: without an update() the next step's unscale_ raises.
            # The scale stays: a non-finite loss is a forward overflow (or bad
            # data), which the loss scale neither causes nor cures, and the
            # dropped step leaves the scaler as it found it.
            self.scaler.update(scale)
            return False  # the gradients stay for the report until the next step clears them
        torch.nn.utils.clip_grads_with_norm_(self.raw.parameters(), self.grad_clip, self._grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.scaler.is_enabled():
            return True
        # Only the scaler's own skip (its scale backs off) can be non-finite
        # here: a step it applied below the floor did change the weights.
        after = self.scaler.get_scale()
        return not (after < scale and after < MIN_LOSS_SCALE)
