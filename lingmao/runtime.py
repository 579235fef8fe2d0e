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
from pathlib import Path

import numpy as np
import torch

from .plan import Plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def apply_runtime(plan: Plan) -> None:
    if plan.device == "cpu" and plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.device == "cuda":
        # The allocator reads PYTORCH_CUDA_ALLOC_CONF once, at its first use;
        # a value the user exported wins over the preset's.
        if plan.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = plan.alloc_conf
            if torch.cuda.is_initialized():  # too late for the variable alone
                torch.cuda.memory._set_allocator_settings(plan.alloc_conf)
        # The current TF32 API; the old allow_tf32 flags warn since torch 2.9.
        torch.backends.cuda.matmul.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if plan.tf32 else "ieee"
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark


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
