"""`python -m lingmao.run hardware=X model=Y ...`: compose -> plan -> train.

Hydra is imported here and in config.py only; `execute` is a plain function
the tests call too.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import CONF_DIR, ConfigError, register, validate
from .data import CorpusError

register()

USER_ERRORS = (ConfigError, CorpusError)


def run_name(cfg, plan) -> str:
    return cfg.tracking.run_name or f"{plan.preset}-{cfg.model.name}-lr{cfg.optim.lr:g}"


def execute(cfg: DictConfig, launch_dir: Path, run_dir: Path, tags: dict | None = None) -> dict | None:
    """Validate, plan, and (unless plan=true) train; returns the final metrics."""
    from . import engine
    from .machine import detect
    from .plan import make_plan, runnable_plan
    from .tracking import Tracker, git_state, launch_host, resolve_uri

    validate(cfg)
    machine = detect()
    if cfg.plan:
        plan = make_plan(cfg, machine)
        print(plan.table())
        return None
    plan = runnable_plan(cfg, machine)
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr)
    if plan.world_size > 1 and "RANK" not in os.environ:
        return _spawn(cfg, plan, launch_dir, run_dir, tags)
    dist = engine.Dist.from_env()
    uri = resolve_uri(cfg.tracking.uri, launch_dir)
    tracker = Tracker(uri, cfg.tracking.experiment_name, run_name(cfg, plan),
                      enabled=cfg.tracking.enabled and dist.main)
    tracker.set_tags({"hardware": plan.preset, "model": cfg.model.name, "data": cfg.data.source,
                      "experiment": cfg.experiment or "", "host": launch_host(),
                      **git_state(launch_dir), **(tags or {})})
    try:
        final = engine.train(cfg, plan, tracker, run_dir, dist)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("KILLED" if final["status"] == "KILLED" else "FINISHED")
    if tracker.enabled:
        print(f"mlflow: {uri} run {tracker.run_id}\n"
              f"  compare: mlflow ui --backend-store-uri {uri}  then open {tracker.ui_url()}")
    if final["status"] == "KILLED":
        raise SystemExit(130)
    return final


def _worker(rank: int, cfg_yaml: str, plan_world: int, port: int, launch_dir: str, run_dir: str, tags) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(plan_world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    execute(OmegaConf.create(cfg_yaml), Path(launch_dir), Path(run_dir), tags)


def _spawn(cfg, plan, launch_dir: Path, run_dir: Path, tags) -> dict | None:
    """One process per device, composed once here (torchrun would give each
    process its own Hydra output folder). Multi-node: use torchrun directly."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(OmegaConf.to_yaml(cfg), plan.world_size, port, str(launch_dir), str(run_dir), tags),
             nprocs=plan.world_size, join=True)
    return None


def _absolute_paths(cfg: DictConfig, launch_dir: Path) -> None:
    """Hydra runs each job in its own folder: paths the user typed are
    relative to where they launched."""
    cfg.data.paths = [str((launch_dir / p).resolve()) for p in cfg.data.paths]
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str((launch_dir / cfg.data.cache_dir).resolve())
    if cfg.resume not in ("auto", "never"):
        cfg.resume = str((launch_dir / cfg.resume).resolve())


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    launch_dir = Path(hydra.utils.get_original_cwd())
    _absolute_paths(cfg, launch_dir)
    tags = {"hydra.job": hc.job.name}
    if hc.mode.name == "MULTIRUN":
        tags.update({"sweep.dir": hc.sweep.dir, "sweep.job": hc.job.num})
    try:
        final = execute(cfg, launch_dir, Path.cwd(), tags)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return None if final is None else final["val/loss"]


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
