"""The bare reference loop: forward, backward, clip, optimizer step. Nothing else.

Same model class, optimizer (lingmao.optim.make_optimizer), warmup + cosine
schedule, precision, per-token loss normalisation and batches (make_loader,
same seed, same epoch order) as lingmao.engine.train, without tracking,
progress, evaluation or checkpoints. It is the yardstick for the engine's
overhead and the loop benchmark mode times; with the same seed it computes
the engine's losses step for step (tests/test_bench.py holds it to that).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from ..data.windows import TokenWindows, make_loader
from ..runtime import autocast, seed_everything
from ..model import GPT, GPTConfig
from ..optim import lr_factor, make_optimizer, set_lr, warmup_steps


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


class NoClock:
    def lap(self, phase: str) -> None:
        pass


def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """Uniform random token ids: a corpus-free stand-in with the real one's shape and dtype."""
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    return np.random.default_rng(seed).integers(0, vocab_size, n_tokens, dtype=dtype)


class BareLoop:
    """Builds in the engine's order (seed, model, compile, optimizer), so the
    initial weights and the data order match an engine run with the same seed."""

    def __init__(self, cfg, plan, windows: TokenWindows, vocab_size: int, total_steps: int):
        self.cfg, self.plan, self.windows = cfg, plan, windows
        self.device = torch.device(plan.device)
        seed_everything(cfg.seed)
        self.raw = GPT(GPTConfig.from_model_config(cfg.model, vocab_size)).to(self.device)
        self.model = torch.compile(self.raw, mode=plan.compile_mode) if plan.compile else self.raw
        o = cfg.optim
        self.optimizer = make_optimizer(self.raw, o, plan)
        self.scaler = torch.amp.GradScaler(plan.device, enabled=plan.grad_scaler)
        self.total_steps = total_steps
        self.warmup = max(1, warmup_steps(o.warmup, total_steps))
        self.tokens_per_step = plan.effective_batch * windows.context_length
        self.steps = 0
        self._set_lr()
        self._stream = self._batches()

    def _set_lr(self) -> None:
        set_lr(self.optimizer, self.plan.lr * lr_factor(self.steps, self.warmup, self.total_steps,
                                                        self.cfg.optim.min_lr_ratio))

    def _batches(self):
        plan, epoch = self.plan, 0
        while True:
            loader = make_loader(self.windows, plan.micro_batch, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                                 num_workers=plan.num_workers, pin_memory=plan.pin_memory,
                                 persistent_workers=plan.persistent_workers, prefetch_factor=plan.prefetch_factor)
            # As in the engine: a new iterator draws a seed from the global RNG
            # that dropout uses, so it is made with that RNG forked.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            yield from batches
            epoch += 1

    def step(self, clock: Clock | None = None) -> torch.Tensor:
        """One optimizer step; returns its loss (per-token mean over the
        effective batch) as a tensor on the device, unsynchronised."""
        clock = clock or NoClock()
        accum = self.plan.accumulation
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            x, y = next(self._stream)
            clock.lap("data")
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.plan):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / (y.numel() * accum)
            self.scaler.scale(loss).backward()
            total += loss.detach()
            clock.lap("forward_backward")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._set_lr()
        clock.lap("optimizer")
        return total

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
