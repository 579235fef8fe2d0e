"""Benchmark mode: a short warm-up, then timed steps of one composed run,
through the engine's own training step (lingmao/bench/loop.py).

Reports samples/s, tokens/s, MFU, the step-time split (data wait,
forward+backward, optimizer, logging) and peak memory. MFU is the model's
training FLOPs (GPT.flops_per_token, PaLM appendix B) over a peak: the
preset's `peak_tflops` where it has one, and a matmul measured in this very
process at the run's precision (the only honest peak for a CPU, whose
attainable FLOPS depend on its cores, clocks, ISA and what else is running).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from lingmao.bench.loop import Clock, Steps
from lingmao.data.windows import TokenWindows
from lingmao.train.backend import DTYPES, matmul_tflops, peak_memory_bytes, reset_peak_memory

PHASES = ("data", "forward_backward", "optimizer", "logging")
PHASE_NAMES = {
    "data": "data wait",
    "forward_backward": "forward+backward",
    "optimizer": "optimizer",
    "logging": "logging",
}


# --- peak memory ---


def current_memory_bytes(device: torch.device) -> int:
    """What the process holds now: RSS on CPU, allocated tensors on CUDA.
    On CPU, the C heap's free pages are handed back first: freed tensors of an
    earlier model stay in RSS otherwise, and the next model reuses them unseen."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # glibc only; musl has no malloc_trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def memory_kind(device: torch.device, fresh: bool) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS" if fresh else "peak RSS since process start"


# --- tokens ---


def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """Uniform random token ids: a corpus-free stand-in with the real one's shape and dtype."""
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    return np.random.default_rng(seed).integers(0, vocab_size, n_tokens, dtype=dtype)


def train_tokens(cfg, synthetic: bool, vocab: int, windows_needed: int, progress: bool = False):
    """(tokens, vocabulary size, stride, description) of the training split:
    the prepared corpus (as the engine reads it), or `windows_needed`
    non-overlapping windows of random tokens, enough that no timed step
    crosses an epoch boundary (a new DataLoader, and with workers new processes)."""
    ctx = cfg.model.context_length
    if synthetic:
        tokens = synthetic_tokens(windows_needed * ctx + 1, vocab, cfg.seed)
        return tokens, vocab, ctx, f"synthetic tokens (vocabulary {vocab})"
    from lingmao.data import load_corpus
    from lingmao.data.windows import default_stride

    data = load_corpus(cfg.data, progress=progress)
    stride = default_stride(cfg.data.stride, ctx)  # as the engine does
    train = data.tokens("train")
    return train, data.vocab_size, stride, f"{cfg.data.source} corpus ({len(train):,} train tokens)"


# --- the timed loop ---


@dataclass
class Result:
    label: str
    device: str
    precision: str
    compile: bool
    params: int
    micro_batch: int
    accumulation: int
    context_length: int
    steps: int
    seconds: float
    flops_per_token: int
    split: dict[str, float]  # seconds per optimizer step
    peak_memory_bytes: int
    memory_kind: str
    base_memory_bytes: int  # held before the model was built: peak - base is what training took
    peaks: dict[str, float] = field(default_factory=dict)  # name -> TFLOPS that MFU is quoted against

    @property
    def samples_per_sec(self) -> float:
        return self.steps * self.micro_batch * self.accumulation / self.seconds

    @property
    def tokens_per_sec(self) -> float:
        return self.samples_per_sec * self.context_length

    @property
    def achieved_tflops(self) -> float:
        return self.flops_per_token * self.tokens_per_sec / 1e12

    def mfu(self, peak: str) -> float:
        return self.achieved_tflops / self.peaks[peak]

    @property
    def data_share(self) -> float:
        return self.split["data"] / sum(self.split.values())

    def lines(self) -> list[str]:
        step = sum(self.split.values())
        parts = " + ".join(
            f"{PHASE_NAMES[p]} {self.split[p] * 1e3:.1f} ms ({self.split[p] / step:.1%})" for p in PHASES
        )
        out = [f"  samples/sec   {self.samples_per_sec:,.2f}", f"  tokens/sec    {self.tokens_per_sec:,.0f}"]
        for i, (name, peak) in enumerate(self.peaks.items()):
            out.append(
                f"  {'MFU' if i == 0 else '':<12}  {self.mfu(name):.1%} of {name} ({peak:,.3g} TFLOPS); "
                f"{self.achieved_tflops:,.3g} TFLOPS achieved at {self.flops_per_token / 1e6:,.1f} MFLOP/token"
            )
        out += [
            f"  step time     {step * 1e3:,.1f} ms = {parts}",
            f"  peak memory   {self.peak_memory_bytes / 2**30:.2f} GiB ({self.memory_kind}), "
            f"{(self.peak_memory_bytes - self.base_memory_bytes) / 2**30:.2f} GiB above what the process held "
            f"before building the model",
        ]
        return out

    def metrics(self, prefix: str) -> dict[str, float]:
        m = {
            f"{prefix}samples_per_sec": self.samples_per_sec,
            f"{prefix}tokens_per_sec": self.tokens_per_sec,
            f"{prefix}achieved_tflops": self.achieved_tflops,
            f"{prefix}peak_memory_gb": self.peak_memory_bytes / 2**30,
            f"{prefix}training_memory_gb": (self.peak_memory_bytes - self.base_memory_bytes) / 2**30,
            f"{prefix}step_seconds": sum(self.split.values()),
            f"{prefix}data_wait_share": self.data_share,
        }
        m.update({f"{prefix}split/{p}_seconds": self.split[p] for p in PHASES})
        for i, name in enumerate(self.peaks):
            m[f"{prefix}mfu" if i == 0 else f"{prefix}mfu_{_slug(name)}"] = self.mfu(name)
        return m


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _steps(loop: Steps, n: int, clock: Clock | None, tracker, log_every: int) -> None:
    for _ in range(n):
        loss = loop.step(clock)
        if loop.steps % log_every == 0:
            tracker.log_metrics({"bench/loss": loss.item()}, loop.steps)  # .item(): the host sync a real loop pays
        if clock:
            clock.lap("logging")


def flash_attention():
    """Only the flash SDPA kernel: fails loudly where it cannot run instead
    of silently timing another kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def timed_passes(
    loop: Steps,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    split_steps: int,
    tracker,
    log_every: int,
    flash: bool,
) -> tuple[float, Clock, bool]:
    """(seconds of the `steps` timed steps, the clock of the split steps,
    whether peak memory was reset after warm-up). On CUDA the seconds come
    from `steps` unsynchronised steps and the split from `split_steps` more;
    on CPU one clocked pass gives both."""
    cuda = device.type == "cuda"
    with flash_attention() if flash else contextlib.nullcontext():
        for _ in range(warmup):
            loop.step()
        loop.sync()
        fresh = reset_peak_memory(device)
        if cuda:
            start = time.perf_counter()
            _steps(loop, steps, None, tracker, log_every)
            loop.sync()
            seconds = time.perf_counter() - start
        clock = Clock(device)
        _steps(loop, split_steps, clock, tracker, log_every)
        if not cuda:
            seconds = sum(clock.phases.values())
    return seconds, clock, fresh


def benchmark(
    cfg,
    plan,
    tokens: np.ndarray,
    vocab_size: int,
    stride: int,
    *,
    steps: int,
    warmup: int,
    tracker,
    label: str = "",
    peaks: dict[str, float] | None = None,
    matmul: bool = True,
    flash: bool = False,
) -> Result:
    """Warm up, then time `steps` optimizer steps of the composed run with the
    engine's step. On CUDA, throughput comes from steps with no synchronisation
    inside, and the split from as many again (up to 10) that synchronise at
    each phase; on CPU one pass gives both."""
    device = torch.device(plan.device)
    base_bytes = current_memory_bytes(device)
    windows = TokenWindows(tokens, cfg.model.context_length, stride)
    cuda = device.type == "cuda"
    split_steps = min(steps, 10) if cuda else steps
    loop = Steps(cfg, plan, windows, vocab_size, total_steps=warmup + steps + (split_steps if cuda else 0))
    seconds, clock, fresh = timed_passes(
        loop,
        device,
        warmup=warmup,
        steps=steps,
        split_steps=split_steps,
        tracker=tracker,
        log_every=cfg.trainer.log_every,
        flash=flash,
    )
    peak_bytes = peak_memory_bytes(device)
    all_peaks = dict(peaks or {})
    if matmul:
        dtype = DTYPES[plan.precision] or torch.float32
        all_peaks[f"{plan.precision} matmul measured here"] = matmul_tflops(device, dtype)
    return Result(
        label=label,
        device=plan.device,
        precision=plan.precision,
        compile=plan.compile,
        params=loop.raw.num_params(),
        micro_batch=plan.micro_batch,
        accumulation=plan.accumulation,
        context_length=cfg.model.context_length,
        steps=steps,
        seconds=seconds,
        flops_per_token=loop.raw.flops_per_token(),
        split={p: clock.phases[p] / split_steps for p in PHASES},
        peak_memory_bytes=peak_bytes,
        memory_kind=memory_kind(device, fresh),
        base_memory_bytes=base_bytes,
        peaks=all_peaks,
    )
