"""How the model is wrapped for several processes: DDP inside torch.compile
(so all-reduce overlaps backward), no buffer broadcast (the rotary tables
are constants), the CUDA device set before the process group starts, and
ranks that share weights but not dropout masks."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch

from lingmao.model.gpt import GPT, GPTConfig
from lingmao.train import distributed
from lingmao.train.distributed import Dist, Parallel, rank_seed


@pytest.fixture
def gloo_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def plan(compile: bool):
    return SimpleNamespace(
        compile=compile, compile_mode="default", activation_checkpointing=False, device="cpu", ddp_backend="gloo"
    )


def tiny():
    return GPT(GPTConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, context_length=8, rotary=True))


def test_ddp_is_inside_compile_and_broadcasts_no_buffers(gloo_group):
    p = Parallel(tiny(), plan(compile=True), Dist(0, 0, 2), torch.device("cpu"))
    assert isinstance(p.module._orig_mod, torch.nn.parallel.DistributedDataParallel)  # compile(DDP(model))
    assert p.ddp.broadcast_buffers is False
    assert p.sync_gradients(last_micro_step=False) is not None
    plain = Parallel(tiny(), plan(compile=False), Dist(), torch.device("cpu"))
    assert plain.ddp is None and plain.module is plain.raw


def test_the_cuda_device_is_set_before_the_process_group_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda *a, **k: calls.append(("init", k.get("device_id")))
    )
    device = distributed.start(SimpleNamespace(device="cuda", ddp_backend="nccl"), Dist(3, 1, 4))
    assert device == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", torch.device("cuda", 1))]


def test_ranks_get_their_own_dropout_seed_and_rank_0_keeps_the_run_seed():
    assert rank_seed(1337, 0) == 1337
    assert len({rank_seed(1337, r) for r in range(8)}) == 8


def test_mfu_divides_by_the_peak_of_every_device_of_the_run():
    from lingmao.train.metrics import run_peak_tflops

    t4 = SimpleNamespace(peak_tflops_per_device=65.0, precision="fp16")
    assert run_peak_tflops(t4, torch.device("cuda"), world_size=2) == 130.0  # t4x2: two T4s, not one
    cpu = SimpleNamespace(peak_tflops_per_device=0.2, precision="fp32")
    assert run_peak_tflops(cpu, torch.device("cpu"), world_size=2) == 0.2  # processes share one CPU
    unknown = SimpleNamespace(peak_tflops_per_device=None, precision="fp32")
    assert 0 < run_peak_tflops(unknown, torch.device("cpu"), world_size=1) < 100  # measured here
