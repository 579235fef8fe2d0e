"""Training metrics between log points: the loss (kept on the device and
read once per interval), throughput, MFU, peak memory."""

from __future__ import annotations

import time

import torch

from lingmao.train.backend import DTYPES, matmul_tflops, peak_memory_bytes
from lingmao.train.step import StepStats


def run_peak_tflops(plan, device: torch.device, world_size: int) -> float:
    """Peak TFLOPS of all the run's devices together, which MFU divides by:
    the datasheet peak per accelerator times the processes (one each), or
    where the plan knows none (an unknown GPU) a matmul measured here. On a
    CPU the processes share one machine, whose peak the plan estimates."""
    per_device = plan.peak_tflops_per_device
    if not per_device:
        per_device = matmul_tflops(device, DTYPES[plan.precision] or torch.float32)
    return per_device * (1 if device.type == "cpu" else world_size)


class Meter:
    """Accumulates steps and turns each log interval into metrics. The
    first interval holds start-up (and compilation), so the run's mean
    throughput leaves it out."""

    def __init__(self, plan, flops_per_token: int, device: torch.device, ddp: bool, world_size: int):
        self.plan, self.flops_per_token, self.device, self.ddp, self.world_size = (
            plan,
            flops_per_token,
            device,
            ddp,
            world_size,
        )
        self.peak_flops = run_peak_tflops(plan, device, world_size) * 1e12
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.first = True
        self.timed_seconds, self.timed_steps = 0.0, 0
        self._t0 = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.steps += 1

    def restart(self) -> None:
        """Time spent from here back to the last restart (an eval, a
        rollback) is not training time."""
        self._t0 = time.perf_counter()

    def drop(self) -> None:
        """Forget the interval so far (a rollback)."""
        self.loss.zero_()
        self.steps = 0
        self.restart()

    def read(self, stats: StepStats, scaler, skipped_steps: int) -> dict:
        """The interval's metrics; one host sync."""
        if self.ddp:  # each rank holds the loss of its share of the batch
            torch.distributed.all_reduce(self.loss)
            self.loss /= self.world_size
        elapsed = time.perf_counter() - self._t0
        if not self.first:
            self.timed_seconds += elapsed
            self.timed_steps += self.steps
        self.first = False
        sps = self.steps * self.plan.effective_batch / elapsed
        tps = sps * self.plan.context_length
        m = {
            "train/loss": self.loss.item() / self.steps,
            "lr": stats.lr,
            "grad_norm": float(stats.grad_norm),
            "samples_per_sec": sps,
            "tokens_per_sec": tps,
            # model FLOPs utilisation (PaLM appendix B) over the peak of every device of the run
            "mfu": tps * self.flops_per_token / self.peak_flops,
            "peak_memory_gb": peak_memory_bytes(self.device) / 2**30,
        }
        if scaler.is_enabled():
            m["loss_scale"] = scaler.get_scale()
        if skipped_steps:
            m["train/skipped_steps"] = skipped_steps
        if stats.moe:
            moe = stats.moe
            m.update(
                {
                    "moe_aux_loss": moe["aux_loss"].item(),
                    "moe_drop_rate": moe["drop_rate"].item(),
                    **{f"moe_load_{i}": v for i, v in enumerate(moe["load"].tolist())},
                }
            )
        self.loss.zero_()
        self.steps = 0
        self.restart()
        return m

    def summary(self) -> dict:
        """The run's mean throughput past the first interval (empty if there was only one)."""
        if not self.timed_steps:
            return {}
        sps = self.timed_steps * self.plan.effective_batch / self.timed_seconds
        return {"samples_per_sec": sps, "tokens_per_sec": sps * self.plan.context_length}
