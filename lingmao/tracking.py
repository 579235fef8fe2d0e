"""MLflow: the one module that imports it.

Metrics are buffered and sent with `log_batch` at flush points (evals, the
end): one synchronous `log_metric` into sqlite costs milliseconds, a large
share of a small model's step.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

_BATCH = 900  # MLflow accepts up to 1000 metrics per log_batch call


def resolve_uri(uri: str | None, launch_dir: Path) -> str:
    """Default `sqlite:///<launch dir>/mlflow.db`, made absolute so Hydra jobs,
    which each run in their own folder, all share one store."""
    if not uri:
        return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{(launch_dir / path).resolve()}"
    if "://" not in uri:  # a plain folder: MLflow's file store
        return str((launch_dir / uri).resolve())
    return uri


def ensure_store(uri: str) -> None:
    """Create (migrate) a sqlite store once, under a file lock: parallel jobs
    that each find no store race on its schema migration and break it."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_state(cwd: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()} if commit else {}


class Tracker:
    """One MLflow run. A disabled tracker accepts every call and does nothing."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, enabled: bool = True):
        self.enabled = enabled
        self.uri = uri
        self.run_id: str | None = None
        self._buffer: list = []
        self.seconds = 0.0  # time spent in tracking calls, reported as overhead
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        ensure_store(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        self.experiment_id = exp_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def ui_url(self, host: str = "http://127.0.0.1:5000") -> str:
        return f"{host}/#/experiments/{self.experiment_id}/runs?compareRunsMode=CHART" if self.enabled else ""

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        t = time.perf_counter()
        ms = int(time.time() * 1000)
        self._buffer.extend((k, float(v), ms, step) for k, v in metrics.items())
        if len(self._buffer) >= _BATCH:
            self.flush()
        self.seconds += time.perf_counter() - t

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        from mlflow.entities import Metric

        t = time.perf_counter()
        for i in range(0, len(self._buffer), _BATCH):
            chunk = [Metric(k, v, ms, s) for k, v, ms, s in self._buffer[i:i + _BATCH]]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._buffer.clear()
        self.seconds += time.perf_counter() - t

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: dict, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, json.dumps(data, ensure_ascii=False, indent=2, default=str), name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status)


def launch_host() -> str:
    return os.uname().nodename
