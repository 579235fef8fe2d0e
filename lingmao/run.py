"""`python -m lingmao.run hardware=X model=Y ...`: compose -> plan -> train.

Hydra is imported here and in config.py only; `execute` is a plain function
the tests call too. Sweeps (`-m`) run through any Hydra launcher or sweeper:
the basic one, joblib (parallel jobs on one machine: each gets its share of
cores and GPUs, see `slot_resources`), Optuna, submitit (SLURM).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import sys
from pathlib import Path

from lingmao.train import clock  # isort: skip - first: trainer.max_time counts from here

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
ABANDON_WAIT = 10.0  # the same for a run whose step a first signal abandoned: it still has seconds


def claim_folder(path: str) -> str:
    """conf/config.yaml's `hydra.run.dir`: `path`, or the first of `path-2`,
    `path-3`... not taken yet, created here (mkdir either creates or fails):
    two runs started in the same second never share a folder. torchrun's
    processes each resolve it: they share the one named, as they always did."""
    if "RANK" in os.environ:
        return path
    base, n = Path(path), 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1


# Cached per composed config: each resolution within one run gives the same folder.
OmegaConf.register_new_resolver("fresh_dir", claim_folder, use_cache=True, replace=True)


def execute(
    cfg: DictConfig, launch_dir: Path, run_dir: Path, tags: dict | None = None, typed: tuple[str, ...] = ()
) -> dict | None:
    """Validate, plan, and (unless plan=true) train; returns the final metrics.
    `typed`: the hardware.* keys the command line set (a fallback keeps them)."""
    from lingmao.data import cache_root
    from lingmao.plan import exit_status
    from lingmao.plan.machine import detect
    from lingmao.plan.make import make_plan, runnable_plan
    from lingmao.plan.summary import render
    from lingmao.train.calibrate import cpu_choice
    from lingmao.train.console import RunLog
    from lingmao.train.distributed import Dist
    from lingmao.train.job import prepare, refuse_early

    clock.job_started()
    validate(cfg)
    machine = detect()
    # Under torchrun (or our own spawn) the launcher fixed the world: across
    # nodes it is larger than the preset's devices on this one.
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None
    cache = cache_root(cfg.data.cache_dir)
    # plan=true reads a calibration the machine has and measures none: it writes nothing
    planner = make_plan if cfg.plan else functools.partial(runnable_plan, typed=typed)  # runnable: refused early
    plan = planner(cfg, machine, world)
    if not cfg.plan:
        refuse_early(cfg, plan, machine)  # before the calibration times any step
        if "RANK" not in os.environ:  # a first line at once: what follows may take a minute
            t = cfg.trainer.max_time
            budget = f" | trainer.max_time={t:g} s from now to the exit" if t else ""
            print(f"lingmao | {plan.preset_reason} | model={cfg.model.name}{budget}", flush=True)
    choice = cpu_choice(cfg, plan, cache, measure=not cfg.plan)
    if choice:
        plan = planner(cfg, machine, world, choice)
        if not cfg.plan:
            refuse_early(cfg, plan, machine)  # with the measured step time
    if cfg.plan:
        print(render(plan))
        return {"plan_exit_status": exit_status(plan)}
    for note in plan.notes:
        print(f"note: {note}")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.world_size > 1 and "RANK" not in os.environ:
        return _spawn(cfg, plan, launch_dir, run_dir, tags, typed)
    dist = Dist.from_env()
    # Everything that can refuse the run (the corpus, the checkpoint to
    # resume) is checked before an MLflow run is created or reopened.
    with RunLog(run_dir) if dist.main else contextlib.nullcontext(), prepare(cfg, plan, run_dir, dist) as job:
        return _train(cfg, plan, job, launch_dir, run_dir, tags)


def _train(cfg, plan, job, launch_dir: Path, run_dir: Path, tags: dict | None) -> dict:
    from lingmao.tracking.record import open_run
    from lingmao.tracking.store import where
    from lingmao.train import checkpoint, engine, signals
    from lingmao.train.console import banner

    dist = job.dist
    tracker = open_run(cfg, plan.preset, run_dir, launch_dir, tags or {}, job.resume_run_id, dist.main)
    if dist.main:
        print(banner(cfg, plan, job, run_dir, where_to_look(tracker.uri) if tracker.enabled else "off"), flush=True)
    signals.when_stuck(lambda: _stopped(tracker, job, "stopped without finishing the step in progress", ABANDON_WAIT))
    try:
        final = engine.train(cfg, plan, tracker, run_dir, dist, job)
        weights = checkpoint.export_weights(job.folder.path) if cfg.tracking.log_model and dist.main else None
        if weights:
            tracker.log_artifact(weights, "model")
        tracker.log_artifact(run_dir / "run.log")
    except KeyboardInterrupt as e:  # a second signal, or a first in a step that cannot end soon: stop now
        if isinstance(e, signals.StepAbandoned):
            _stopped(tracker, job, str(e), ABANDON_WAIT)
        else:
            _stopped(tracker, job, "stopped at once by a second signal", SECOND_SIGNAL_WAIT)
        raise SystemExit(130) from None
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        signals.when_stuck(None)
    tracker.end("KILLED" if final["status"] == "KILLED" else "FINISHED")
    # The run's MLflow model (serves), linked to its val metrics; tracking off imports no mlflow at all.
    if weights and tracker.enabled and not tracker.offline and final["status"] != "KILLED":
        from lingmao.tracking.pyfunc import log_run_model

        log_run_model(tracker, weights, cfg.tracking.register)
    if tracker.ui_url() and not tracker.offline:
        print(f"mlflow: {tracker.uri} run {tracker.run_id}\n  compare: {where(tracker.uri, tracker.experiment_id)}")
    if final["status"] == "KILLED":
        raise SystemExit(130)
    return final


def _stopped(tracker, job, how: str, wait: float) -> None:
    """A run stopped before its step ended: the MLflow run KILLED (what the store
    has not taken within `wait` s is spooled), and what was kept."""
    tracker.timeout = min(tracker.timeout, wait)
    tracker.end("KILLED")
    last = job.folder.path / "last.pt"
    kept = f"the last checkpoint is {last}" if last.exists() else "no checkpoint was written"
    print(f"{how}; {kept}", file=sys.stderr, flush=True)


def where_to_look(uri: str) -> str:
    """The banner's MLflow part: a server's own page, or the command that serves a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri} (open {uri}; the run's link follows once it is open)"
    return f"{uri} (the run's link follows once it is open; mlflow ui --backend-store-uri {uri})"


def _worker(rank: int, cfg_yaml: str, plan_world: int, port: int, launch_dir: str, run_dir: str, tags, typed) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(plan_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    execute(OmegaConf.create(cfg_yaml), Path(launch_dir), Path(run_dir), tags, tuple(typed))
    # Done and the process group destroyed: leave without C++ static
    # destructors, where gloo's store client can still hold a joinable thread
    # after rank 0 tore the store down (SIGABRT at exit in about 1 of 5 runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(cfg, plan, launch_dir: Path, run_dir: Path, tags, typed: tuple[str, ...]) -> dict | None:
    """One process per device, composed once here (torchrun would give each
    process its own Hydra output folder). Multi-node: use torchrun directly."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _worker,
        args=(OmegaConf.to_yaml(cfg), plan.world_size, port, str(launch_dir), str(run_dir), tags, typed),
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
    run_dir = Path(hc.runtime.output_dir)
    fresh = hc.mode.name == "RUN" and run_dir != launch_dir and {p.name for p in run_dir.iterdir()} <= {".hydra"}
    typed = tuple(o.lstrip("+~").split("=", 1)[0] for o in hc.overrides.task if o.lstrip("+~").startswith("hardware."))
    try:
        final = execute(cfg, launch_dir, Path.cwd(), tags, typed)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        if fresh:  # refused before anything was kept in it: no empty run folder for every refusal
            _remove_folder(run_dir, launch_dir)
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


def _remove_folder(run_dir: Path, launch_dir: Path) -> None:
    """A refused run's own folder, and the date folders above it that it leaves empty."""
    os.chdir(launch_dir)  # Hydra ran the job inside it
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == launch_dir or launch_dir not in parent.parents:
            break
        try:
            parent.rmdir()  # only while empty: other runs' folders stay
        except OSError:
            break


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

    clock.command_started()
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
