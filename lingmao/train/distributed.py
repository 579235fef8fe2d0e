"""Processes of one run: who is rank 0, the process group, decisions all
ranks take together, and how the model is wrapped for them.

Compile and DDP are applied to the model here, not inside it: the model is
plain nn.Module code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from lingmao.plan import Plan


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_env() -> Dist:
        return Dist(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )


def start(plan: Plan, dist: Dist) -> torch.device:
    """This process's device, and the process group when there are several."""
    if plan.device == "cuda":
        device = torch.device("cuda", dist.local_rank)
        # Before NCCL starts: otherwise every rank's communicator lands on cuda:0.
        torch.cuda.set_device(device)
    else:
        device = torch.device(plan.device)
    if dist.ddp:
        torch.distributed.init_process_group(
            plan.ddp_backend,
            rank=dist.rank,
            world_size=dist.world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return device


def finish(dist: Dist) -> None:
    if dist.ddp:
        # Leave together: a rank that tears its process group down while
        # rank 0 still saves and sends can abort in gloo at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Parallel:
    """The model as the step runs it: DDP around the plain module (one
    replica per process), then torch.compile around that, so the compiled
    graph breaks at DDP's bucket boundaries and all-reduce overlaps backward."""

    def __init__(self, raw: torch.nn.Module, plan: Plan, dist: Dist, device: torch.device):
        self.raw = raw
        raw.activation_checkpointing = plan.activation_checkpointing
        self.ddp = None
        module = raw
        if dist.ddp:
            # broadcast_buffers=False: the only buffers are the rotary tables,
            # the same constants on every rank.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
            module = self.ddp
        self.module = torch.compile(module, mode=plan.compile_mode) if plan.compile else module

    def __call__(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.module(x, **kwargs)

    def sync_gradients(self, last_micro_step: bool):
        """Gradients are all-reduced on the last micro-step of an optimizer
        step only; the others accumulate locally."""
        if self.ddp is None or last_micro_step:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


def from_rank0(obj, dist: Dist):
    """Rank 0's `obj` on every rank: what rank 0 read from its disk (a
    checkpoint), so nodes without a shared filesystem start alike."""
    if not dist.ddp:
        return obj
    box = [obj if dist.main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.ddp:
        return [obj]
    out = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's seed for what must differ between ranks (dropout masks);
    rank 0 keeps `seed` itself, so one process draws what it always did."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**63


def agree(flags: list, device: torch.device, ddp: bool) -> list[bool]:
    """Decisions every rank takes together (one rank stopping or skipping
    alone would leave the others waiting in the next all-reduce), read with
    one host sync. Entries are bools or 0-dim device tensors."""
    if not ddp:
        return [bool(f) for f in flags]  # bool() of a device tensor is the sync
    t = torch.tensor([0.0 if torch.is_tensor(f) else float(f) for f in flags], device=device)
    for i, f in enumerate(flags):
        if torch.is_tensor(f):
            t[i] = f
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]
