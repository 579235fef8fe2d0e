"""Process-wide settings a run applies before its first step: threads,
TF32, cudnn, the CUDA allocator, autocast and seeds. Everything here reads
the Plan; nothing reads a hardware preset."""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lingmao.config import ConfigError
from lingmao.plan import Plan
from lingmao.plan.machine import ALLOC_ENV, ALLOC_MARK

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def apply_runtime(plan: Plan) -> None:
    if plan.device == "cpu" and plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device == "cuda":
        apply_alloc_conf(plan.alloc_conf)
        # The current TF32 API; the old allow_tf32 flags warn since torch 2.9.
        torch.backends.cuda.matmul.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark


def apply_alloc_conf(want: str) -> None:
    """The plan's allocator setting. The allocator reads PYTORCH_CUDA_ALLOC_CONF
    once, when CUDA starts: machine.detect reads the GPUs through NVML, which
    does not start it, or else puts the CUDA presets' setting in place before
    asking torch. A value the user exported wins over the plan's."""
    now = os.environ.get(ALLOC_ENV)
    detects = now is not None and os.environ.get(ALLOC_MARK) == now
    if (now is not None and not detects) or (now or "") == want:
        return
    if torch.cuda.is_initialized():
        started = f"with {ALLOC_ENV}={now}" if now else f"without {ALLOC_ENV}"
        hint = f"export {ALLOC_ENV}={want} to have them" if want else f"export {ALLOC_ENV}= to run without"
        print(
            f"warning: CUDA started {started}, before the plan's allocator settings ({want or 'none'}) "
            f"could apply; {hint}",
            file=sys.stderr,
        )
        return
    os.environ.pop(ALLOC_MARK, None)
    if want:
        os.environ[ALLOC_ENV] = want
    else:
        os.environ.pop(ALLOC_ENV, None)


def apply_night(ns, plan: Plan, device: torch.device) -> None:
    """Night mode's thread count (CPU) or memory cap (CUDA)."""
    if plan.device == "cpu":
        torch.set_num_threads(ns.threads)
    elif plan.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(ns.memory_fraction, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(plan: Plan):
    dtype = DTYPES[plan.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA's allocator peak, else the peak RSS
    (Linux's VmHWM; ru_maxrss elsewhere, which counts bytes on macOS and KiB
    on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, AttributeError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Start peak_memory_bytes over from what is held now, so that one
    phase's peak (an eval's) is not reported as the next one's. On CPU,
    Linux resets VmHWM to the current RSS when "5" is written to
    /proc/self/clear_refs (proc(5)); elsewhere the CPU peak stays the
    process's, and this returns False."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Best of three timed runs of square matmuls: the FLOPS this process can
    reach at this precision right now (on a shared CPU, with its neighbours)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    burst = 10 if device.type == "cuda" else 1  # CUDA launches are async: sync once per burst

    def trial() -> float:
        reps, start = 0, time.perf_counter()
        while True:
            for _ in range(burst):
                a @ b
            reps += burst
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * n**3 * reps / elapsed / 1e12

    trial()  # warm-up: library init, thread pool, clocks
    return max(trial() for _ in range(3))


DEVICES = ("auto", "cpu", "cuda", "mps")  # what a reading command (generate, eval) runs on


def pick_device(asked: str) -> torch.device:
    if asked == "auto":
        asked = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[asked]:
        raise ConfigError(f"device={asked}: not available on this machine; use device=auto or device=cpu")
    return torch.device(asked)
