"""Fixed-length training windows over a flat token array, and their DataLoader."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from lingmao.data.corpus import CorpusError


def default_stride(stride: int | None, context_length: int) -> int:
    """`data.stride`, or half a context when unset: each token is seen in two
    windows, once late in one (much context) and once early in the next."""
    return stride or max(1, context_length // 2)


class TokenWindows(Dataset):
    """Window i covers tokens[i*stride : i*stride + context_length + 1]; x is its head, y its tail.

    Indexing with a list of window indices returns a whole batch from one numpy
    read, which is how make_loader uses it.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, split: str | None = None):
        if not 1 <= stride <= context_length:
            raise CorpusError(f"data.stride={stride}: must be between 1 and the context length ({context_length})")
        n = len(tokens)
        if n < context_length + 1:
            what = {"train": "the training split", "val": "the validation split"}.get(split, "the corpus")
            fix = "raise data.val_fraction, add data" if split == "val" else "add data"
            raise CorpusError(
                f"{what} has {n} tokens; context length {context_length} needs at least "
                f"{context_length + 1}: {fix}, or lower model.context_length"
            )
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        self.n = (n - context_length - 1) // stride + 1
        self._offsets = np.arange(context_length + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(index, dtype=np.int64)
        if ((idx < 0) | (idx >= self.n)).any():
            raise IndexError(f"window index out of range 0..{self.n - 1}")
        # (batch?, T+1) gather; astype copies out of the memmap into int64
        chunk = torch.from_numpy(self.tokens[idx[..., None] * self.stride + self._offsets].astype(np.int64))
        return chunk[..., :-1], chunk[..., 1:]

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver get the dataset pickled:
        # send a memmap's file name, not a copy of the whole corpus.
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and t.filename is not None:
            state["tokens"] = (t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


def make_loader(
    windows: TokenWindows,
    micro_batch: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    drop_last: bool = True,
) -> DataLoader:
    """Batches of (x, y), each (micro_batch, context_length) int64.

    A DistributedSampler even for one process: with the same seed and epoch,
    the ranks of a multi-process run get disjoint shares of the very order a
    single process would use.
    """
    sampler = DistributedSampler(
        windows, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    # The BatchSampler hands whole index lists to TokenWindows.__getitem__ (batch_size=None
    # turns off per-item collation): one fancy-indexed read per batch, not micro_batch reads.
    batches = BatchSampler(sampler, micro_batch, drop_last=drop_last)
    workers = num_workers > 0
    return DataLoader(
        windows,
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers,
        prefetch_factor=prefetch_factor if workers else None,
    )
