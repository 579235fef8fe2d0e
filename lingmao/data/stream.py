"""Training batches epoch after epoch, resumable from a stored position."""

from __future__ import annotations

import itertools

import torch

from lingmao.data.windows import TokenWindows, make_loader


def loader_args(plan) -> dict:
    """The DataLoader settings of a run's plan."""
    return dict(
        num_workers=plan.num_workers,
        pin_memory=plan.pin_memory,
        persistent_workers=plan.persistent_workers,
        prefetch_factor=plan.prefetch_factor,
    )


class BatchStream:
    """Batches of `micro_batch` windows for this rank, epoch after epoch,
    from a position a checkpoint stored: (epoch, windows of it already seen,
    all ranks together)."""

    def __init__(
        self,
        windows: TokenWindows,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        loader_args: dict,
        epoch: int = 0,
        seen: int = 0,
    ):
        self.windows, self.micro_batch, self.seed, self.loader_args = windows, micro_batch, seed, loader_args
        self.rank, self.world_size = rank, world_size
        self.per_batch = micro_batch * world_size
        self.epoch, self.seen = epoch, seen - seen % self.per_batch
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._batches is None:
                loader = make_loader(
                    self.windows,
                    self.micro_batch,
                    shuffle=True,
                    seed=self.seed,
                    epoch=self.epoch,
                    rank=self.rank,
                    world_size=self.world_size,
                    **self.loader_args,
                )
                # A new DataLoader iterator draws a seed from torch's global RNG, the one
                # dropout uses; a resumed run makes one where the unbroken run did not.
                with torch.random.fork_rng(devices=[]):
                    batches = iter(loader)
                # The epoch's order is a pure function of (seed, epoch): dropping the
                # batches already seen restores the position exactly.
                self._batches = itertools.islice(batches, self.seen // self.per_batch, None)
            batch = next(self._batches, None)
            if batch is not None:
                self.seen += self.per_batch
                return batch
            self.epoch, self.seen, self._batches = self.epoch + 1, 0, None


class Replay:
    """The first `n` batches of `stream`, over and over: a model that cannot
    drive their loss towards zero has a bug (debug=overfit)."""

    def __init__(self, stream: BatchStream, n: int):
        self.stream, self.n, self.cache = stream, n, []
        self.epoch, self.seen = stream.epoch, stream.seen

    def __iter__(self):
        return self

    def __next__(self):
        if len(self.cache) < self.n:
            self.cache.append(next(self.stream))
            return self.cache[-1]
        self.cache.append(self.cache.pop(0))
        return self.cache[-1]
