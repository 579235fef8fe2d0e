"""The engine's training step, driven by the bench one step at a time.

Built as lingmao.train.engine's Run builds it (step.build, distributed.Parallel,
data.stream.BatchStream, optim.Schedule) and stepped through the engine's
TrainStep, so benchmark mode, the suites and the speedrun race time and
train exactly what a real run does, without its tracking, progress,
evaluation or checkpoints.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from lingmao.data.stream import BatchStream, loader_args
from lingmao.data.windows import TokenWindows
from lingmao.train.distributed import Dist, start
from lingmao.train.optim import Schedule
from lingmao.train.step import build_step


class Clock:
    """Charges wall time to named phases. On CUDA each lap synchronises first,
    so a phase pays for its own kernels rather than the next phase's wait."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.phases: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self._sync:
            self._sync()
        now = time.perf_counter()
        self.phases[phase] += now - self._last
        self._last = now


class Steps:
    """One process's model, optimizer, batches and schedule, in the engine's
    build order (seed, model, optimizer, compile), so the initial weights and
    the data order are an engine run's with the same seed."""

    def __init__(self, cfg, plan, windows: TokenWindows, vocab_size: int, total_steps: int):
        self.cfg, self.plan = cfg, plan
        self.device = start(plan, Dist())  # one process: the device, no process group
        parts = build_step(cfg, plan, vocab_size, self.device, Dist())
        self.raw, self.optimizer, self.scaler, self.model = parts.raw, parts.optimizer, parts.scaler, parts.model
        self.train_step = parts.step
        self.batches = BatchStream(windows, plan.micro_batch, cfg.seed, 0, 1, loader_args(plan))
        o = cfg.optim
        self.schedule = Schedule.for_run(plan.lr, o.warmup, total_steps, o.min_lr_ratio)
        self.tokens_per_step = plan.effective_batch * windows.context_length
        self.steps = 0

    def step(self, clock: Clock | None = None) -> torch.Tensor:
        """One optimizer step; returns its loss (per-token mean over the
        effective batch) as a tensor on the device. A step that was not finite
        is not applied (the engine's check) and returns its non-finite loss."""
        stats = self.train_step.step(self.batches, self.schedule.lr(self.steps), clock=clock)
        self.steps += 1
        return stats.loss

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run_for(self, seconds: float) -> float:
        """Steps until at least `seconds` have passed; returns tokens/s."""
        self.sync()
        start = time.perf_counter()
        steps = 0
        while True:
            self.step()
            steps += 1
            self.sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps * self.tokens_per_step / elapsed
