"""`python -m lingmao.run hardware=X model=Y ...`: compose -> plan -> train.

Hydra is imported here and in config.py only; `execute` is a plain function
the tests call too. Sweeps (`-m`) run through any Hydra launcher or sweeper:
the basic one, joblib (parallel jobs on one machine: each gets its share of
cores and GPUs, see `slot_resources`), Optuna, submitit (SLURM).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lingmao.config import ConfigError
from lingmao.config.compose import CONF_DIR, register
from lingmao.config.rules import validate
from lingmao.data.corpus import CorpusError

register()

USER_ERRORS = (ConfigError, CorpusError)  # bad input: exit 2
SECOND_SIGNAL_WAIT = 3.0  # seconds a run stopped by a second signal still gives the tracking store


def execute(cfg: DictConfig, launch_dir: Path, run_dir: Path, tags: dict | None = None) -> dict | None:
    """Validate, plan, and (unless plan=true) train; returns the final metrics."""
    from lingmao.data import cache_root
    from lingmao.plan import exit_status
    from lingmao.plan.machine import detect
    from lingmao.plan.make import make_plan, runnable_plan
    from lingmao.plan.summary import render
    from lingmao.train.calibrate import cpu_choice
    from lingmao.train.console import RunLog
    from lingmao.train.distributed import Dist
    from lingmao.train.job import prepare

    validate(cfg)
    machine = detect()
    # Under torchrun (or our own spawn) the launcher fixed the world: across
    # nodes it is larger than the preset's devices on this one.
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None
    cache = cache_root(cfg.data.cache_dir)
    # plan=true reads a calibration the machine has and measures none: it writes nothing
    planner = make_plan if cfg.plan else runnable_plan  # runnable: refused before any work
    plan = planner(cfg, machine, world)
    choice = cpu_choice(cfg, plan, cache, measure=not cfg.plan)
    if choice:
        plan = planner(cfg, machine, world, choice)
    if cfg.plan:
        print(render(plan))
        return {"plan_exit_status": exit_status(plan)}
    for note in plan.notes:
        print(f"note: {note}")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.world_size > 1 and "RANK" not in os.environ:
        return _spawn(cfg, plan, launch_dir, run_dir, tags)
    dist = Dist.from_env()
    # Everything that can refuse the run (the corpus, the checkpoint to
    # resume) is checked before an MLflow run is created or reopened.
    with RunLog(run_dir) if dist.main else contextlib.nullcontext(), prepare(cfg, plan, run_dir, dist) as job:
        return _train(cfg, plan, job, launch_dir, run_dir, tags)


def _train(cfg, plan, job, launch_dir: Path, run_dir: Path, tags: dict | None) -> dict:
    from lingmao.tracking.record import open_run
    from lingmao.tracking.store import where
    from lingmao.train import checkpoint, engine
    from lingmao.train.console import banner

    dist = job.dist
    tracker = open_run(cfg, plan.preset, run_dir, launch_dir, tags or {}, job.resume_run_id, dist.main)
    if dist.main:
        uri = tracker.uri
        look = f"{uri} (the run's link follows once it is open; mlflow ui --backend-store-uri {uri})"
        print(banner(cfg, plan, job, run_dir, look if tracker.enabled else "off"), flush=True)
    try:
        final = engine.train(cfg, plan, tracker, run_dir, dist, job)
        if cfg.tracking.log_model and dist.main:
            tracker.log_artifact(checkpoint.export_weights(job.folder.path), "model")
        tracker.log_artifact(run_dir / "run.log")
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM: stop now, without a traceback
        tracker.timeout = min(tracker.timeout, SECOND_SIGNAL_WAIT)  # what the store has not taken by then is spooled
        tracker.end("KILLED")
        last = job.folder.path / "last.pt"
        kept = f"the last checkpoint is {last}" if last.exists() else "no checkpoint was written"
        print(f"stopped at once by a second signal; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("KILLED" if final["status"] == "KILLED" else "FINISHED")
    if tracker.ui_url() and not tracker.offline:
        print(f"mlflow: {tracker.uri} run {tracker.run_id}\n  compare: {where(tracker.uri, tracker.experiment_id)}")
    if final["status"] == "KILLED":
        raise SystemExit(130)
    return final


def _worker(rank: int, cfg_yaml: str, plan_world: int, port: int, launch_dir: str, run_dir: str, tags) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(plan_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    execute(OmegaConf.create(cfg_yaml), Path(launch_dir), Path(run_dir), tags)
    # Done and the process group destroyed: leave without C++ static
    # destructors, where gloo's store client can still hold a joinable thread
    # after rank 0 tore the store down (SIGABRT at exit in about 1 of 5 runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(cfg, plan, launch_dir: Path, run_dir: Path, tags) -> dict | None:
    """One process per device, composed once here (torchrun would give each
    process its own Hydra output folder). Multi-node: use torchrun directly."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _worker,
        args=(OmegaConf.to_yaml(cfg), plan.world_size, port, str(launch_dir), str(run_dir), tags),
        nprocs=plan.world_size,
        join=True,
    )
    return None


def _absolute_paths(cfg: DictConfig, launch_dir: Path) -> None:
    """Hydra runs each job in its own folder: paths the user typed are
    relative to where they launched."""
    cfg.data.paths = [str((launch_dir / p).resolve()) for p in cfg.data.paths]
    if cfg.data.prepared_dir:
        cfg.data.prepared_dir = str((launch_dir / cfg.data.prepared_dir).resolve())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str((launch_dir / cfg.data.cache_dir).resolve())
    if cfg.resume not in ("auto", "never"):
        cfg.resume = str((launch_dir / cfg.resume).resolve())


# -- Hydra ----------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from lingmao.sweep import sweep_job

    hc = HydraConfig.get()
    launch_dir = Path(hydra.utils.get_original_cwd())
    _absolute_paths(cfg, launch_dir)
    tags = {"hydra.job": hc.job.name}
    if hc.mode.name == "MULTIRUN":
        tags.update(sweep_job(hc, launch_dir, cfg))
    try:
        final = execute(cfg, launch_dir, Path.cwd(), tags)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from lingmao.train.checkpoint import (
            CheckpointWriteError,
        )  # loaded by execute already: torch stays off --help's path
        from lingmao.train.nan_policy import NonFiniteError

        if not isinstance(e, (NonFiniteError, CheckpointWriteError)):
            raise
        print(f"error: {e}", file=sys.stderr)  # says what happened and what was kept: no traceback
        sys.exit(1)
    if final and final.get("plan_exit_status") and hc.mode.name == "RUN":
        sys.exit(final["plan_exit_status"])  # plan=true of a run that does not fit (a sweep plans on)
    return None if final is None else final.get("val/loss")


class SweepSummary(Callback):
    """Registered in conf/config.yaml (hydra.callbacks): once a multirun has
    ended, say where its runs are in MLflow (or which spools to import)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from lingmao.tracking.provenance import sweep_id
        from lingmao.tracking.spool import sweep_report
        from lingmao.tracking.store import resolve_uri

        if config.plan or not config.tracking.enabled:
            return
        launch_dir = Path(config.hydra.runtime.cwd)
        sweep_dir = launch_dir / config.hydra.sweep.dir
        uri = resolve_uri(config.tracking.uri, launch_dir)
        try:
            print(sweep_report(uri, config.tracking.experiment_name, sweep_id(sweep_dir), sweep_dir))
        except Exception as e:  # the sweep itself is done: a report that fails must not fail it
            print(f"warning: no MLflow summary of the sweep: {type(e).__name__}: {e}", file=sys.stderr)


def main() -> None:
    """The CLI. Hydra's own errors (an unknown key, a wrong type, a missing
    preset) come out as one `error:` line saying what is valid, exit 2.
    HYDRA_FULL_ERROR=1 (Hydra's documented switch) makes Hydra raise them
    instead of printing them; set by the user, it keeps Hydra's full report."""
    from lingmao.config.errors import explain

    if "plan=true" in (a.lower() for a in sys.argv[1:]) and not {"-m", "--multirun"} & set(sys.argv[1:]):
        # plan=true touches nothing: no run folder, no .hydra copy of the config
        given = {a.split("=", 1)[0] for a in sys.argv[1:]}
        sys.argv += [o for o in ("hydra.run.dir=.", "hydra.output_subdir=null") if o.split("=", 1)[0] not in given]
    asked = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as e:
        message = None if asked == "1" else explain(e, sys.argv[1:], _hydra_main.__wrapped__.__code__)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if asked is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked


if __name__ == "__main__":
    main()
