"""The only module that asks the hardware what it is.

`detect()` returns a plain `Machine` record; everything that decides (the
plan) takes a Machine as an argument, so tests can describe any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The CUDA caching allocator reads this once, as CUDA starts.
ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# Holds the value detect() gave ALLOC_ENV itself (the user had set none), so
# that a plan asking for another one warns instead of taking it for the user's;
# in the environment, so DDP's processes see it too.
ALLOC_MARK = "LINGMAO_DETECT_ALLOC_CONF"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    compute_capability: float  # 8.0 = Ampere, 8.9 = Ada, 7.5 = Turing, 9.0 = Hopper


@dataclass(frozen=True)
class Machine:
    cores: int
    ram_gb: float
    cpu_flags: frozenset = frozenset()
    gpus: tuple = ()  # tuple[Gpu, ...]
    mps: bool = False

    @property
    def gpu(self) -> Gpu | None:
        """The GPU a plan sizes for: DDP runs the same micro-batch on every
        device, so the one with the least memory (the first of equals); None
        without CUDA."""
        return min(self.gpus, key=lambda g: g.memory_gb) if self.gpus else None

    @property
    def native_bf16_cpu(self) -> bool:
        # Only for the bench's report: whether the CPU has AMX bf16 tiles. The
        # plan does not decide by it; lingmao/calibrate.py measures instead.
        return "amx_bf16" in self.cpu_flags


def _cpu_flags() -> frozenset:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _nvml_gpus() -> tuple[Gpu, ...] | None:
    """The visible CUDA devices through NVML, which (unlike asking torch)
    does not start CUDA: PYTORCH_CUDA_ALLOC_CONF, set from the plan, only
    counts if it is in the environment before CUDA starts. None where NVML
    is missing or CUDA_VISIBLE_DEVICES names devices by UUID."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver, or no nvidia-ml-py
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        parts = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
        if parts is not None and not all(p.lstrip("-").isdigit() for p in parts):
            return None
        indices = []
        for i in range(count) if parts is None else map(int, parts):
            if not 0 <= i < count:
                break  # CUDA ignores the list from the first invalid entry on
            indices.append(i)
        gpus = []
        for i in indices:
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(
                Gpu(
                    name.decode() if isinstance(name, bytes) else name,
                    pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                    float(f"{major}.{minor}"),
                )
            )
        return tuple(gpus)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def cuda_presets_alloc_conf() -> str:
    """The allocator setting every CUDA preset shares (conf/hardware), which
    hardware=auto on any GPU resolves to; "" if they differ."""
    from lingmao.config.presets import HARDWARE, hardware_preset

    confs = {p["alloc_conf"] for p in map(hardware_preset, HARDWARE) if p["device"] == "cuda"}
    return confs.pop() if len(confs) == 1 else ""


def _torch_gpus() -> tuple[Gpu, ...]:
    """The CUDA devices as torch reads them, which starts CUDA: the allocator
    setting goes into the environment first, the one the plan will ask for
    unless hardware.alloc_conf says otherwise (backend.apply_runtime then
    warns). A value the user exported is left as it is."""
    import torch

    if not torch.cuda.is_available():  # is_available and device_count do not start CUDA
        return ()
    if ALLOC_ENV not in os.environ and (conf := cuda_presets_alloc_conf()):
        os.environ[ALLOC_ENV] = os.environ[ALLOC_MARK] = conf
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(p.name, p.total_memory / 2**30, float(f"{p.major}.{p.minor}")))
    return tuple(gpus)


def detect() -> Machine:
    """This machine: every visible CUDA device (CUDA_VISIBLE_DEVICES
    applies), its name, memory and compute capability, read through NVML
    so CUDA is not started yet (torch where NVML is missing); MPS; CPU
    cores, RAM and flags."""
    import torch

    gpus = _nvml_gpus()
    if gpus is None:
        gpus = _torch_gpus()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Machine(cores=_cores(), ram_gb=_ram_gb(), cpu_flags=_cpu_flags(), gpus=gpus, mps=mps)
