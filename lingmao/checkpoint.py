"""Checkpoints: atomic writes, safe loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save(state: dict, path: Path) -> Path:
    """Write to a temporary file, fsync, then rename: a kill during the save
    leaves the previous checkpoint intact and never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str = "cpu") -> dict:
    # weights_only: a checkpoint file cannot run code when it is loaded.
    return torch.load(path, map_location=map_location, weights_only=True)


def model_state(model: torch.nn.Module) -> dict:
    """State dict without the `_orig_mod.` prefix torch.compile adds, so a
    checkpoint loads into a plain model."""
    model = getattr(model, "module", model)  # DDP wraps the compiled module
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()
