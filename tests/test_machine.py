import os
from types import SimpleNamespace

import pytest
import torch
from test_config import make

from lingmao.plan.machine import Gpu, Machine, detect
from lingmao.plan.make import make_plan, runnable_plan
from lingmao.plan.peaks import PEAKS, dense_bf16_tflops, peak_for


def fake_cuda(monkeypatch, *gpus):
    """torch.cuda answering as a machine with these (name, total bytes, major, minor) devices;
    what detect() puts in the environment before asking it is undone after the test."""
    from lingmao.plan.machine import ALLOC_ENV, ALLOC_MARK

    for name in (ALLOC_ENV, ALLOC_MARK):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored (or removed) at teardown
        if not os.environ[name]:
            monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    props = [SimpleNamespace(name=n, total_memory=b, major=ma, minor=mi) for n, b, ma, mi in gpus]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])


def test_detect_on_this_machine():
    m = detect()
    assert m.cores >= 1 and m.ram_gb > 0
    assert len(m.gpus) == torch.cuda.device_count()


def test_detect_reads_every_cuda_device(monkeypatch):
    fake_cuda(monkeypatch, ("Tesla T4", 15_835_398_144, 7, 5))
    m = detect()
    assert m.gpus == (Gpu("Tesla T4", 15_835_398_144 / 2**30, 7.5),)


def test_one_detected_t4_plans_one_process_on_the_t4_preset(monkeypatch):
    """A Colab or Kaggle T4 used to map to t4x2: refused, or a second rank on a cuda:1 that does not exist."""
    fake_cuda(monkeypatch, ("Tesla T4", 15_835_398_144, 7, 5))
    plan = runnable_plan(make("model=medium"), detect())
    assert (plan.preset, plan.world_size, plan.precision) == ("t4", 1, "fp16")
    assert plan.fits and plan.effective_batch == 256
    assert plan.peak_tflops_per_device == 65.0 and "Tesla T4" in plan.peak_source


def test_two_detected_v100s_take_their_count_and_peak(monkeypatch):
    fake_cuda(monkeypatch, *[("Tesla V100-SXM2-32GB", 34_089_730_048, 7, 0)] * 2)
    plan = make_plan(make("model=large"), detect())
    assert (plan.preset, plan.world_size, plan.precision) == ("t4x2", 2, "fp16")
    assert plan.memory_gb == pytest.approx(31.7, abs=0.1)  # the detected memory, not the T4 preset's 16
    assert plan.peak_tflops_per_device == 125.0


def test_mixed_gpus_are_sized_for_the_smallest():
    m = Machine(8, 64, gpus=(Gpu("NVIDIA GeForce RTX 4090", 23.6, 8.9), Gpu("NVIDIA GeForce RTX 3060", 11.7, 8.6)))
    assert m.gpu.name == "NVIDIA GeForce RTX 3060"
    assert make_plan(make("model=large"), m).memory_gb == 11.7


@pytest.mark.parametrize(
    "name, precision, tf32, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
        ("NVIDIA H100 PCIe", "bf16", False, 756.0),
        ("NVIDIA H100 NVL", "fp16", False, 835.0),
        ("NVIDIA H200", "bf16", False, 989.4),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),  # not the SXM's 989.4
        ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
        ("NVIDIA L4", "bf16", False, 121.0),
        ("NVIDIA L40S", "bf16", False, 362.0),
        ("NVIDIA A10", "bf16", False, 125.0),
        ("Tesla V100-PCIE-16GB", "fp16", False, 112.0),
        ("Tesla T4", "fp16", False, 65.0),
        ("Tesla T4", "fp32", True, 8.1),  # no TF32 units on Turing: plain fp32
        ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
        ("NVIDIA GeForce RTX 3090", "bf16", False, 71.0),
        ("NVIDIA GeForce RTX 3060", "fp32", False, 12.7),
    ],
)
def test_peaks_by_device_name_and_precision(name, precision, tf32, tflops):
    assert peak_for(name).for_precision(precision, tf32) == tflops


def test_peak_names_match_whole_words_only():
    assert peak_for("NVIDIA A10G") is None  # not the A10's 125
    assert peak_for("NVIDIA A100-PCIE-40GB").bf16 == 312.0  # not the A10's
    assert peak_for("NVIDIA L40S").bf16 == 362.0 and peak_for("NVIDIA L40").bf16 == 181.0
    assert peak_for("Some Future GPU") is None
    assert dense_bf16_tflops("Tesla T4") is None  # no bf16 tensor cores
    assert len({key for key, _ in PEAKS}) == len(PEAKS)


class FakeNvml:
    """pynvml as a machine with these (name, total bytes, major, minor) devices answers it."""

    def __init__(self, *gpus):
        self.gpus = gpus

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h[0].encode()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Memory", (), {"total": h[1]})()

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h[2], h[3]


def test_gpus_are_read_through_nvml_without_starting_cuda(monkeypatch):
    import sys

    from lingmao.plan.machine import detect

    t4 = ("Tesla T4", 15 * 2**30, 7, 5)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(t4, t4, t4))

    def no_cuda(*a):
        raise AssertionError("asking torch would start CUDA before PYTORCH_CUDA_ALLOC_CONF is set")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [(g.name, g.compute_capability) for g in detect().gpus] == [("Tesla T4", 7.5)] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert len(detect().gpus) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")  # CUDA stops at the first invalid entry
    assert len(detect().gpus) == 1


def test_allocator_settings_go_through_the_environment_or_a_warning_never_a_private_api(monkeypatch, capsys):
    from test_plan import H100, make

    from lingmao.plan.make import make_plan
    from lingmao.train.backend import apply_runtime

    plan = make_plan(make("hardware=rtx4090"), H100)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA already started
    monkeypatch.setattr(
        torch.cuda.memory,
        "_set_allocator_settings",
        lambda *a: (_ for _ in ()).throw(AssertionError("private, deprecated API")),
    )
    apply_runtime(plan)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert "export PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128" in capsys.readouterr().err


@pytest.fixture
def no_alloc_env(monkeypatch):
    """No PYTORCH_CUDA_ALLOC_CONF (nor lingmao's note of who set it) now, and none left after the test."""
    from lingmao.plan.machine import ALLOC_ENV, ALLOC_MARK

    for name in (ALLOC_ENV, ALLOC_MARK):
        monkeypatch.setenv(name, "")  # undone at teardown: restored, or removed again
        monkeypatch.delenv(name)


def fake_cuda_that_starts(monkeypatch, *gpus) -> dict:
    """fake_cuda, where asking for a device's properties starts CUDA, as in
    torch: returns what PYTORCH_CUDA_ALLOC_CONF was at that moment."""
    seen = {}
    fake_cuda(monkeypatch, *gpus)
    props = torch.cuda.get_device_properties

    def get_device_properties(i):
        seen.setdefault("alloc_conf", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        seen["started"] = True
        return props(i)

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: seen.get("started", False))
    return seen


@pytest.mark.parametrize(
    "gpu", [("NVIDIA H200", 150_754_820_096, 9, 0), ("Tesla T4", 15_835_398_144, 7, 5), ("RTX 3060", 12 * 2**30, 8, 6)]
)
def test_without_nvml_the_allocator_setting_is_in_place_before_cuda_starts(monkeypatch, capsys, no_alloc_env, gpu):
    from lingmao.train.backend import apply_runtime

    seen = fake_cuda_that_starts(monkeypatch, gpu)
    plan = make_plan(make(), detect())  # hardware=auto: the preset comes from what detect found
    assert seen["alloc_conf"] == plan.alloc_conf != ""
    apply_runtime(plan)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == plan.alloc_conf
    assert "warning" not in capsys.readouterr().err


def test_an_allocator_setting_cuda_started_without_is_warned_of_and_the_users_export_wins(
    monkeypatch, capsys, no_alloc_env
):
    from lingmao.train.backend import apply_runtime

    t4 = ("Tesla T4", 15_835_398_144, 7, 5)
    fake_cuda_that_starts(monkeypatch, t4)
    plan = make_plan(make("hardware.alloc_conf=expandable_segments:True"), detect())
    apply_runtime(plan)
    err = capsys.readouterr().err
    assert "CUDA started" in err and "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in err

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")  # the user's own
    seen = fake_cuda_that_starts(monkeypatch, t4)
    apply_runtime(make_plan(make(), detect()))
    assert seen["alloc_conf"] == os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    assert "warning" not in capsys.readouterr().err
