"""A run that passed every check that can refuse it, before any tracking:
the corpus, its windows and schedule, and the checkpoint to resume."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lingmao.config import ConfigError
from lingmao.data import load_corpus
from lingmao.data.corpus import CorpusError
from lingmao.data.prepare import Prepared
from lingmao.data.tokenizer import tokenizer_hash
from lingmao.data.windows import TokenWindows, default_stride
from lingmao.plan import Plan
from lingmao.plan.summary import duration
from lingmao.train import checkpoint, clock
from lingmao.train.distributed import Dist
from lingmao.train.optim import Schedule
from lingmao.train.recovery import RunLock, job_differences


@dataclass
class Job:
    """A run that passed every check that can refuse it, before any tracking."""

    cfg: object
    plan: Plan
    dist: Dist
    run_dir: Path
    data: Prepared
    train_windows: TokenWindows
    val_windows: TokenWindows
    stride: int
    steps_per_epoch: int
    schedule: Schedule
    folder: checkpoint.Folder
    found: tuple[Path, dict] | None  # the checkpoint to resume from
    same_job: bool  # `found` is of this job: continue its MLflow run
    lock: RunLock | None  # rank 0's hold on the checkpoint folder

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock:
            self.lock.release()

    @property
    def resume_run_id(self) -> str | None:
        return (self.found[1].get("mlflow_run_id") or None) if self.found and self.same_job else None


def refuse_early(cfg, plan: Plan, machine) -> None:
    """What this machine cannot run as asked, refused before any work (the
    corpus, a calibration): more threads than cores, or one step longer than
    the whole time budget."""
    threads, cores = cfg.hardware.threads, machine.cores
    if threads and threads > cores:
        raise ConfigError(
            f"hardware.threads={threads} is more than the {cores} core(s) this process may use: oversubscribed "
            f"threads make every step many times slower, other jobs' too; use 1..{cores}, or 0 for one per core"
        )
    step, budget = plan.est_step_seconds, cfg.trainer.max_time
    if step and budget and step > budget:
        how = "measured by the CPU calibration" if plan.assumed_mfu is None else f"at {plan.assumed_mfu:.0%} MFU"
        raise ConfigError(
            f"model={cfg.model.name} model.context_length={plan.context_length} micro-batch {plan.micro_batch} x "
            f"accumulation {plan.accumulation}: one step is estimated at ~{duration(step)} ({how}), longer than the "
            f"whole budget, trainer.max_time={budget:g}; lower model.context_length, hardware.batch or "
            f"hardware.accumulation, take a smaller model, or raise trainer.max_time (plan=true shows the estimate)"
        )


def prepare(cfg, plan: Plan, run_dir: Path, dist: Dist | None = None) -> Job:
    """Load the corpus, fit the batches to it, and find and check the
    checkpoint to resume: everything that can refuse the run does so here,
    before an MLflow run is opened or touched."""
    dist = dist or Dist.from_env()
    began = time.time()
    data = load_corpus(cfg.data, progress=dist.main and cfg.trainer.progress)
    if (data.dir / "meta.json").stat().st_mtime >= began:  # prepared just now: outside trainer.max_time
        clock.outside(time.time() - began)
    if dist.main and data.meta.get("skipped_records"):
        print(
            f"warning: the corpus skipped {data.meta['skipped_records']} empty or bad record(s) "
            f"(data.on_bad_record={cfg.data.on_bad_record})",
            file=sys.stderr,
        )
    ctx = cfg.model.context_length
    stride = default_stride(cfg.data.stride, ctx)
    train_windows = TokenWindows(data.tokens("train"), ctx, stride, "train")
    steps_per_epoch = len(train_windows) // (plan.micro_batch * dist.world_size * plan.accumulation)
    if steps_per_epoch < 1:
        raise CorpusError(
            f"the training split has {len(train_windows)} windows, fewer than one effective batch "
            f"({plan.effective_batch}); lower hardware.batch / hardware.accumulation or add data"
        )
    t = cfg.trainer
    limits = [n for n in (t.max_steps, t.max_epochs and t.max_epochs * steps_per_epoch) if n]
    o = cfg.optim
    schedule = Schedule.for_run(plan.lr, o.warmup, min(limits) if limits else None, o.min_lr_ratio, t.max_time)
    val_windows = TokenWindows(data.tokens("val"), ctx, ctx, "val")
    folder = checkpoint.Folder(run_dir / cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    lock = RunLock(folder.path).acquire() if dist.main else None
    try:
        found, same_job = _resume_point(cfg, folder, tokenizer_hash(data.tokenizer()), dist)
    except BaseException:
        lock and lock.release()
        raise
    return Job(
        cfg,
        plan,
        dist,
        run_dir,
        data,
        train_windows,
        val_windows,
        stride,
        steps_per_epoch,
        schedule,
        folder,
        found,
        same_job,
        lock,
    )


def _resume_point(cfg, folder: checkpoint.Folder, tok_hash: str, dist: Dist) -> tuple[tuple | None, bool]:
    """(the checkpoint to resume from, whether it is of this very job). A
    checkpoint of another shape, tokenizer or token stream is refused;
    resume=auto also refuses one of another job (another LR, seed...), whose
    folder this run must not continue in. An explicit resume=FILE of another
    job starts a new MLflow run from those weights."""
    if not dist.main:  # rank 0's checkpoint reaches the others (Checkpointer.start): disks need not be shared
        return None, False
    found = checkpoint.find_resume(cfg.resume, folder)
    if found is None:
        return None, False
    path, state = found
    now = cfg_dict(cfg)
    checkpoint.check_compatible(state, now, tok_hash, path)
    diffs = job_differences(state["config"], now)
    if diffs and cfg.resume == "auto":
        raise checkpoint.ResumeError(
            f"resume=auto: {path} is a checkpoint of another job; it differs in: {'; '.join(diffs)}. Rerun with its "
            f"settings to continue it, or use another run folder (hydra.run.dir=...) or resume=never"
        )
    return found, not diffs


def cfg_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
