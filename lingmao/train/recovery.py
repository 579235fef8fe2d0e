"""Checkpointing a run and resuming it: what goes into a checkpoint, when
one is due, restore, rollback. File-level I/O (atomic writes, safe loads,
the folder's rolling files) is checkpoint.py's."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lingmao.train import checkpoint
from lingmao.train.distributed import Dist, from_rank0, rank_seed
from lingmao.train.step import TrainState

clock = time.monotonic  # checkpoint.every_minutes is measured on it


# Keys a resumed run may change and still be the same job: how long it
# trains, how it evaluates, logs, checkpoints and is tracked, and the machine
# it runs on. Any other difference makes it another job.
RESUMABLE = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.eval_every",
    "trainer.eval_batches",
    "trainer.log_every",
    "trainer.progress",
    "trainer.early_stop_patience",
    "trainer.on_nan",
    "trainer.nan_lr_factor",
    "checkpoint.",
    "tracking.",
    "hardware.",
    "night_mode",
    "night.",
    "resume",
    "plan",
    "experiment",
    "data.cache_dir",
    "data.on_bad_record",
    "data.paths",
    "data.prepared_dir",
)


def job_differences(saved: dict, now: dict) -> list[str]:
    """The settings, outside RESUMABLE, in which config `now` differs from a
    checkpoint's `saved` one. A key the checkpoint lacks came after it (its
    shape-bearing keys are checkpoint.check_compatible's): not a difference."""
    a, b = checkpoint.flat(saved), checkpoint.flat(now)
    return [
        f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
        for k in sorted(a)
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE)
    ]


class RunLock:
    """An exclusive lock on a run's checkpoint folder, so two processes
    (a requeued job while the old one still runs) never write over each
    other's checkpoints. flock: the OS drops the lock when its holder dies,
    so a dead process's lock is taken over without ceremony."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        # Beside the folder, not in it: the folder holds checkpoints only.
        self.folder, self.path = folder, folder.parent / f".{folder.name}.lock"
        self._file = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "{}"
            f.close()
            h = json.loads(holder) if holder.startswith("{") else {}
            raise checkpoint.ResumeError(
                f"{self.folder} is in use by process {h.get('pid', '?')} on {h.get('host', '?')}: wait for "
                f"it to end, or give this run another folder (hydra.run.dir=...)"
            ) from None
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def restore(state: dict, raw, optimizer, scaler, device: torch.device, rank: int = 0) -> TrainState:
    """Load a checkpoint's tensors and this rank's RNG states; return its TrainState."""
    raw.load_state_dict(state["model"])
    # The config's optimizer settings win over the checkpoint's (a resume may
    # change weight decay or betas); the moments and step counts come from it.
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, s in zip(optimizer.param_groups, settings):
        group.update(s)
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    checkpoint.set_rng_state(ranks[rank] if rank < len(ranks) else state["rng"], device)
    if rank >= len(ranks):  # more processes than the run that saved it had: a stream of its own
        torch.manual_seed(rank_seed(state["config"]["seed"] + state["progress"]["step"], rank))
    return TrainState(**state["progress"])


class Checkpointer:
    """The run's checkpoints: `resume_from` (found and checked before
    anything else touches the run), `save`, `rollback`, and whether one is
    due by time. Rank 0 writes; every rank loads."""

    def __init__(
        self, folder: checkpoint.Folder, every_steps: int | None, every_minutes: float | None, meta: dict, main: bool
    ):
        self.folder, self.every_steps, self.every_minutes = folder, every_steps, every_minutes
        self.meta = meta  # config, plan, tokenizer, schedule: the same in every checkpoint of the run
        self.main = main
        self.last_good: Path | None = None
        self.saved_at = -1
        self._last_time = clock()

    def due(self, step: int) -> bool:
        """By step count; `due_by_time` is the other half, a decision all ranks share."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        return bool(self.every_minutes) and clock() - self._last_time >= self.every_minutes * 60

    def start(self, found: tuple[Path, dict] | None, raw, optimizer, scaler, device, dist: Dist) -> TrainState:
        """The state to start from: the checkpoint `found` (rank 0's, the same
        on every rank), loaded into the model, optimizer, scaler and this
        rank's RNGs, or a fresh one."""
        if found is None:
            return TrainState()
        path, state = found
        s = restore(state, raw, optimizer, scaler, device, dist.rank)
        self.last_good, self.saved_at = path, s.step
        return s

    def save(self, s: TrainState, tensors: dict, val: float | None, run_id: str | None) -> Path:
        """Checkpoint the state after step s.step; `tensors`: model,
        optimizer, scaler state dicts and RNG states."""
        best = val is not None and val < s.best_saved_val
        if best:
            s.best_saved_val = val
        path = self.folder.path / f"step{s.step:08d}.pt"
        if self.main:
            path = self.folder.write(
                {
                    "format": checkpoint.FORMAT,
                    **tensors,
                    "progress": asdict(s),
                    "val_loss": val,
                    **self.meta,
                    "mlflow_run_id": run_id or "",
                },
                s.step,
                best,
            )
        self.last_good, self.saved_at, self._last_time = path, s.step, clock()
        return path

    def rollback(self, raw, optimizer, scaler, device, dist: Dist, lr_scale: float) -> TrainState:
        """Back to the last checkpoint (rank 0 reads it), with the LR scaled by `lr_scale`."""
        state = from_rank0(checkpoint.load(self.last_good) if dist.main else None, dist)
        s = restore(state, raw, optimizer, scaler, device, dist.rank)
        s.lr_scale = lr_scale
        return s
