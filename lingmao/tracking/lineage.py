"""What the MLflow run that trained a checkpoint recorded: its store, name,
tags and val metrics at the checkpoint's step, for a model card and for
logging the checkpoint as the run's MLflow model later (`lingmao export`)."""

from __future__ import annotations

from pathlib import Path

from lingmao.config.options import OptionError
from lingmao.tracking.locate import launch_dir, mlflow_run
from lingmao.tracking.store import open_store, resolve_uri, store_uri


def run_store(state: dict, checkpoint: Path, tracking_uri: str = "") -> str:
    """The store the checkpoint's run logged to: `tracking_uri` if given,
    else its config's tracking.uri read from where the run was launched."""
    if tracking_uri and "://" not in tracking_uri and Path(tracking_uri).is_file():
        tracking_uri = f"sqlite:///{Path(tracking_uri).resolve()}"  # the path of an mlflow.db
    if tracking_uri:
        return store_uri(tracking_uri)
    configured = state["config"].get("tracking", {}).get("uri")
    launched = launch_dir(Path(checkpoint))
    return resolve_uri(configured, launched) if launched else store_uri(configured)


def run_record(state: dict, checkpoint: Path, tracking_uri: str = "") -> dict:
    """{run_id, run_name, uri, experiment_id, tags, metrics}: `metrics` holds
    the run's val/... values at the checkpoint's step (its last value of each
    where that step has none). OptionError when the checkpoint has no run or
    the store does not have it."""
    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise OptionError(f"{checkpoint} has no MLflow run (trained with tracking.enabled=false)")
    run, uri = mlflow_run(run_id, run_store(state, checkpoint, tracking_uri))
    client, step = open_store(uri), state.get("progress", {}).get("step")
    metrics = {}
    for key, last in run.data.metrics.items():
        if not key.startswith("val/") or key.startswith("val/samples/"):
            continue
        at_step = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        metrics[key] = at_step[-1] if at_step else last
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "uri": uri,
        "experiment_id": run.info.experiment_id,
        "tags": dict(run.data.tags),
        "metrics": metrics,
    }
