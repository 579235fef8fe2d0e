"""One job of a Hydra multirun: what its sweep varies, and, when jobs run in
parallel on one machine, its share of the cores and GPUs (a slot)."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lingmao.tracking.provenance import sweep_id
from lingmao.tracking.record import name_suffix


def sweep_job(hc, launch_dir: Path, cfg) -> dict:
    """The MLflow tags of this multirun job (HydraConfig `hc`): the sweep's id
    and folder, the job's number, what its sweep varies (`sweep.values`, and
    `experiment` when no experiment preset names the question) and, for
    parallel jobs, its slot; sets `cfg.hardware.threads` to the slot's share
    when the user left it to the cores."""
    sweep_dir = launch_dir / hc.sweep.dir
    tags = {"sweep.id": sweep_id(sweep_dir), "sweep.dir": hc.sweep.dir, "sweep.job": hc.job.num}
    launched = sweep_dir / "multirun.yaml"  # the multirun's command line, written before any job
    sweep = list(OmegaConf.load(launched).hydra.overrides.task) if launched.is_file() else []
    params = OmegaConf.to_container(hc.sweeper).get("params") or {}
    tags["sweep.values"] = swept_overrides(list(hc.overrides.task), sweep + [f"{k}={v}" for k, v in params.items()])
    # cfg.experiment is set only by an experiments/*.yaml preset; a plain
    # `-m optim.lr=a,b` sweep is named by the keys it varies instead of "".
    keys = [kv.split("=", 1)[0] for kv in tags["sweep.values"].split() if "=" in kv]
    tags["experiment"] = cfg.experiment or (f"sweep over {', '.join(keys)}" if keys else "sweep")
    slot = job_slot(OmegaConf.to_container(hc.launcher), sweep_dir, hc.job.num)
    if slot is not None:
        number, threads, gpus = slot
        tags["sweep.slot"] = number
        if gpus:
            tags["sweep.gpus"] = ",".join(gpus)  # CUDA_VISIBLE_DEVICES of this job
        if not cfg.hardware.threads:  # 0 or unset: one per core, of this job's share
            cfg.hardware.threads = threads
    return tags


def swept_overrides(job: list[str], sweep: list[str]) -> str:
    """Of a job's overrides, those its sweep varies: the keys that carry a
    sweep (`a,b`, range, interval...) in `sweep`, the multirun's overrides
    and the sweeper's params. `optim.lr=0.001 optim.warmup=0`: the tag
    sweep.values, which the report and the UI's columns read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        keys = {o.key_or_group for o in parser.parse_overrides(sweep) if o.is_sweep_override()}
        return " ".join(
            f"{o.key_or_group}={o.get_value_element_as_str()}"
            for o in parser.parse_overrides(job)
            if o.key_or_group in keys
        )
    except HydraException:  # a sweeper's own syntax: no values recorded, no error
        return ""


def swept_values(job: list[str], sweep: list[str]) -> str:
    """What a sweep job's run name adds to `<hardware>-<model>-lr<lr>`: the
    swept overrides but the LR, which the name carries already."""
    return name_suffix(swept_overrides(job, sweep))


def parallel_jobs(launcher: dict, cores: int) -> int:
    """How many jobs of a sweep run at once on this machine: joblib's n_jobs
    (negative counts back from the cores, as joblib does: -1 is all of them),
    else 1. The basic launcher runs jobs one after another; SLURM gives each
    job its own allocation."""
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n = launcher.get("n_jobs") or 1
    return max(1, n if n > 0 else cores + 1 + n)


def slot_resources(slot: int, jobs: int, cores: int, gpu_ids: list[str]) -> tuple[int, list[str]]:
    """(threads, GPU ids) of job slot `slot` when `jobs` jobs run at once.
    Cores are split evenly: two jobs on 2 cores with 2 OpenMP threads each ran
    6x slower than with one each. GPUs go in contiguous blocks, one block per
    slot; with fewer GPUs than slots, slots share them round-robin."""
    threads = max(1, cores // jobs)
    if not gpu_ids:
        return threads, []
    per = len(gpu_ids) // jobs
    if per == 0:
        return threads, [gpu_ids[slot % len(gpu_ids)]]
    return threads, gpu_ids[slot * per : (slot + 1) * per]


def lock_free_slot(folder: Path, jobs: int, preferred: int, wait: float = 30.0):
    """(slot, open lock file): the first slot, from `preferred` on, that no
    running job holds (an exclusive flock on folder/slot<N>.lock). Waits up
    to `wait` seconds when all are held (a worker that is still exiting),
    then shares `preferred`, with a warning."""
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        for slot in [(preferred + i) % jobs for i in range(jobs)]:
            f = open(folder / f"slot{slot}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return slot, f
            except BlockingIOError:
                f.close()
        if time.monotonic() > deadline:
            print(f"warning: all {jobs} job slots in {folder} are held; sharing slot {preferred}", file=sys.stderr)
            return preferred, None
        time.sleep(0.2)


def _gpu_ids() -> list[str]:
    """Visible NVIDIA GPUs, counted through NVML: asking CUDA would start it,
    and CUDA reads CUDA_VISIBLE_DEVICES only when it starts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver (or no nvidia-ml-py): no GPUs to share out
        return []


_SLOT: tuple | None = None  # (slot, threads, GPU ids, lock file), this process's for its whole life


def job_slot(launcher: dict, sweep_dir: Path, job_num: int) -> tuple[int, int, list[str]] | None:
    """The slot of this process when a sweep runs jobs in parallel here, with
    its threads and GPUs (CUDA_VISIBLE_DEVICES set), or None for sequential
    jobs. joblib (loky) reuses worker processes, and a process can pick its
    GPUs only before CUDA starts, so a worker keeps the slot it claimed first
    for every job it runs. Job number modulo n_jobs alone would put two jobs on
    one GPU whenever jobs finish out of order; it is the slot tried first."""
    global _SLOT
    cores = len(os.sched_getaffinity(0))
    jobs = parallel_jobs(launcher, cores)
    if jobs == 1:
        return None
    if _SLOT is None:
        if (launcher.get("n_jobs") or 0) < 0:
            print(
                f"note: hydra.launcher.n_jobs={launcher['n_jobs']} makes {jobs} job slots on {cores} cores, "
                f"{max(1, cores // jobs)} thread(s) each; with fewer jobs than that, set n_jobs to the number "
                f"to run at once",
                file=sys.stderr,
            )
        gpus = _gpu_ids()
        slot, lock = lock_free_slot(sweep_dir / ".lingmao-slots", jobs, job_num % jobs)
        threads, mine = slot_resources(slot, jobs, cores, gpus)
        if mine:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        _SLOT = (slot, threads, mine, lock)
    return _SLOT[:3]
