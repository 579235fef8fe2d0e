"""The bare reference loop of the engine-overhead benchmark (suite=cpu part
1), and nothing else: every other measurement trains through the engine's
own step (lingmao/bench/loop.py).

Forward, backward, clip, optimizer step, written out here independently of
lingmao.train.step.TrainStep: what the engine does beyond this (the finiteness
check and its host sync, metrics, logging, progress) is the overhead the
benchmark measures. It is built like the engine (same model, optimizer,
schedule, precision and batches, same seed and epoch order) and computes
the engine's losses step for step, the MoE load-balancing loss included
(tests/test_bench.py holds it to that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lingmao.bench.loop import Steps
from lingmao.train.backend import autocast
from lingmao.train.optim import set_lr


class BareLoop(Steps):
    def step(self, clock=None) -> torch.Tensor:
        """One optimizer step; returns its cross-entropy (per-token mean over
        the effective batch) as a tensor on the device, unsynchronised."""
        set_lr(self.optimizer, self.schedule.lr(self.steps))
        accum, aux_weight = self.plan.accumulation, self.cfg.model.moe.aux_loss_weight
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.plan):
                logits = self.model(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / (y.numel() * accum)
            moe = self.raw.moe_stats()
            self.scaler.scale(ce + aux_weight * moe["aux_loss"] / accum if moe else ce).backward()
            total += ce.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return total
