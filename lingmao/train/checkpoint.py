"""Checkpoints: atomic writes, safe loads, the run's checkpoint folder, and
which file a run resumes from.

A checkpoint is one torch file that `torch.load(weights_only=True)` reads:
tensors, numbers, strings, lists, tuples and dicts only, so loading one never
runs code. The engine stores in it everything an exact resume needs:

    format           FORMAT
    model            state dict without torch.compile's `_orig_mod.` or DDP's `module.`
    optimizer        optimizer.state_dict()
    scaler           GradScaler.state_dict() ({} when there is no scaler)
    schedule         peak LR, warmup, total steps, floor: the LR is a pure function of the step
    progress         step, epoch, windows seen in the epoch, LR scale, early-stopping and best state
    rng              python, numpy and torch (+ cuda or mps) generator states (tensors, ints)
    val_loss         the val loss measured at this step (None: no eval, e.g. a stop on a signal)
    config, plan     the resolved config and the run plan
    tokenizer_hash   sha256 of the tokenizer
    tokenizer        the tokenizer itself (tokenizer.json's text, a few hundred kB)
    mlflow_run_id    the MLflow run the metrics went to

DataLoader workers hold no state of ours: the batch order of an epoch is a
pure function of (seed, epoch) (DistributedSampler), so the position (epoch,
windows seen) is all it takes to continue the data stream.

The folder holds `step00000120.pt`-style files (the newest `keep_last` by
write time), and `last.pt` / `best.pt`: hard links to the newest file and to
the one with the lowest val loss, which therefore cost no disk space.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from lingmao.config import ConfigError
from lingmao.config.keys import fill_absent
from lingmao.data.tokenizer import tokenizer_hash
from lingmao.model.gpt import GPT, GPTConfig

FORMAT = 1
# What torch.load raises for a truncated, corrupt or foreign file.
_UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


class ResumeError(ConfigError):
    """`resume=...` names no usable checkpoint, or one that does not fit the
    run's settings. A ConfigError, so the CLI prints it as one `error:` line."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the message says
    what survived."""


def save(state: dict, path: Path) -> Path:
    """Write to a temporary file, fsync, then rename: a kill or a full disk
    during the save leaves the previous checkpoint intact and never a
    half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos ..."
                free = shutil.disk_usage(path.parent).free / 2**20
                raise OSError(f"{str(e).splitlines()[0][:200]} ({free:.0f} MiB free on that disk)") from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open a folder."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s data, atomically: a hard link where the
    filesystem has them, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, mmap: bool = False) -> dict:
    """A lingmao checkpoint's state; ResumeError if the file is unreadable or
    not one. mmap=True maps the tensors instead of reading them: checking a
    file or reading its metadata then costs almost nothing."""
    try:
        # weights_only: a checkpoint file cannot run code when it is loaded.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except _UNREADABLE as e:
        raise ResumeError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:300]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a lingmao checkpoint (format {FORMAT})")
    return state


def model_state(model: torch.nn.Module) -> dict:
    """State dict without the `_orig_mod.` prefix torch.compile adds, so a
    checkpoint loads into a plain model."""
    model = getattr(model, "module", model)  # DDP wraps the compiled module
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def rng_state(device: torch.device) -> dict:
    """Every generator a training step may draw from (dropout draws from
    torch's), in weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state`'s generators; a device generator only where the
    checkpoint was made on that kind of device."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


class Folder:
    """A run's checkpoint folder: rolling step files, last.pt and best.pt."""

    def __init__(self, path: Path, keep_last: int):
        self.path = Path(path)
        self.keep_last = keep_last
        self._swept = False
        self._readable: dict[tuple, bool] = {}  # (path, mtime, size) -> loads

    def steps(self) -> list[Path]:
        """Step files, newest first. By write time, not step number: after a
        resume from an older file the newer-numbered ones are stale."""
        files = self.path.glob("step*.pt") if self.path.is_dir() else []
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)

    def write(self, state: dict, step: int, best: bool) -> Path:
        path = self.path / f"step{step:08d}.pt"
        last = self.path / "last.pt"
        if not self._swept:  # temp files of a process killed mid-save
            for stale in self.path.glob(".*.tmp*"):
                stale.unlink(missing_ok=True)
            self._swept = True
        try:
            save(state, path)
            _link(path, last)
            if best:
                _link(path, self.path / "best.pt")
        except OSError as e:
            kept = f"the previous checkpoint {last} is intact" if last.exists() else "there is no earlier checkpoint"
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {e.strerror or e}. Nothing partial was left behind and {kept}; "
                f"free space (or point checkpoint.dir elsewhere), then rerun in the same run directory "
                f"(resume=auto continues from the newest checkpoint)"
            ) from e
        self._prune(path)
        return path

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep_last` readable step files. An unreadable one
        (resume=auto skipped it with a warning) neither counts nor goes while
        it is newer than those: a corrupt file never costs a good one."""
        kept = 0
        for old in self.steps():
            if kept >= self.keep_last:
                old.unlink(missing_ok=True)
            elif old == newest or self.readable(old):
                kept += 1

    def readable(self, path: Path) -> bool:
        """Whether `path` loads as a checkpoint (its metadata only: mmap), once per file version."""
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self._readable:
            try:
                load(path, mmap=True)
                self._readable[key] = True
            except ResumeError:
                self._readable[key] = False
        return self._readable[key]


def export_weights(folder: Path) -> Path:
    """`model.pt` beside the folder's best checkpoint (last.pt if there was
    no eval): its weights, config and tokenizer only, what generation and
    eval need; about a third of a checkpoint, which also holds the
    optimizer's moments."""
    folder = Path(folder)
    source = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    state = load(source)
    keep = (
        "format",
        "model",
        "config",
        "plan",
        "tokenizer_hash",
        "tokenizer",
        "mlflow_run_id",
        "val_loss",
        "progress",
        "schedule",
    )
    return save({k: state[k] for k in keep if k in state}, folder.parent / "model.pt")


def find_resume(resume: str, folder: Folder, quiet: bool = False) -> tuple[Path, dict] | None:
    """(path, mmap-loaded state) of the checkpoint to continue from, or None
    for a fresh start. `resume`: auto (the newest readable file in the run's
    folder, skipping unreadable ones with a warning), never, or a file."""
    if resume == "never":
        return None
    if resume == "auto":
        for path in folder.steps():
            try:
                return path, load(path, mmap=True)
            except ResumeError as e:
                if not quiet:
                    print(f"warning: resume=auto skips {e}; trying the previous checkpoint", file=sys.stderr)
        return None
    path = Path(resume)
    if not path.is_file():
        raise ResumeError(
            f"resume={resume}: no such file; valid values are auto, never, or a checkpoint file "
            f"(e.g. outputs/myrun/checkpoints/last.pt)"
        )
    return path, load(path, mmap=True)


# Keys whose values make a checkpoint's weights or token stream mean something
# else: the model's (but for its name and the training-only knobs below) and
# every data setting that changes the tokens, data.split_seed (the train/val
# split) among them. Everything else (hardware, optimizer, trainer, stride)
# may change here; resume=auto also wants the same job (checkpointer.py).
_FREE_KEYS = {
    "model.name",
    "model.dropout",
    "model.moe.capacity_factor",
    "model.moe.aux_loss_weight",
    "data.cache_dir",
    "data.stride",
    "data.on_bad_record",
}


def flat(node: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys; an empty dict is a value."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _bound_settings(cfg: dict) -> dict:
    data = dict(cfg.get("data", {}))
    data.setdefault("split_seed", cfg.get("seed"))  # before data.split_seed the run's seed chose the split
    settings = flat({"model": cfg.get("model", {}), "data": data})
    return {k: v for k, v in settings.items() if k not in _FREE_KEYS}


def check_compatible(state: dict, cfg: dict, tokenizer_hash: str, path: Path) -> None:
    """Refuse a checkpoint from another model shape, tokenizer or token
    stream, listing every difference."""
    # A key added since the checkpoint was written: the value it had before it existed.
    saved, now = _bound_settings(fill_absent(state["config"])), _bound_settings(cfg)
    diffs = [
        f"  {k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if state["tokenizer_hash"] != tokenizer_hash:
        diffs.append(
            f"  tokenizer (sha256): checkpoint {state['tokenizer_hash'][:12]} vs this corpus {tokenizer_hash[:12]}"
        )
    if diffs:
        raise ResumeError(
            f"cannot resume from {path}: it was trained with other settings:\n"
            + "\n".join(diffs)
            + "\nResume with the checkpoint's settings, or start fresh with resume=never (or in a new run directory)."
        )


def load_model(path, device: torch.device, tokenizer_path: str = ""):
    """(model in eval mode, tokenizer, checkpoint state) from a lingmao checkpoint file."""
    from tokenizers import Tokenizer

    state = load(Path(path))  # ResumeError: unreadable, or not a lingmao checkpoint
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
        if tokenizer_hash(tok) != state.get("tokenizer_hash"):
            raise ResumeError(
                f"tokenizer={tokenizer_path} is not the vocabulary {path} was trained with "
                f"(its hash differs from the checkpoint's tokenizer_hash)"
            )
    elif "tokenizer" in state:
        tok = Tokenizer.from_str(state["tokenizer"])
    else:
        raise ResumeError(
            f"{path} does not embed its tokenizer; pass tokenizer=PATH: the run's MLflow artifact "
            f"tokenizer.json, or tokenizer.json in the prepared corpus folder"
        )
    # The tokenizer's size, not the embedding's: model.vocab_multiple pads the rows.
    model = GPT(GPTConfig.from_model_config(state["config"]["model"], tok.get_vocab_size()))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tok, state


def script_of(state: dict) -> str:
    """The checkpoint corpus' data.script (simplified, the schema's default, for a config without one)."""
    return state["config"].get("data", {}).get("script", "simplified")
