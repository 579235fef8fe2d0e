"""Where a checkpoint and its MLflow store are, for `generate` and `eval`.

`checkpoint=` takes a .pt file, a run folder (its checkpoints/last.pt, or
best.pt with `which=best`), or an MLflow run id: the run's `run_dir` tag
names its folder (a run that was resumed also has `resumed_from`, the
checkpoint it continued from, whose folder is the run's checkpoint folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from lingmao.config.options import OptionError, choice

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids are uuid4 hex
WHICH = ("last", "best")
RUN_DIR_TAG = "run_dir"


def checkpoint_path(spec: str, which: str = "last", tracking_uri: str = "") -> Path:
    """The .pt file `spec` (a file, a run folder or an MLflow run id) means."""
    choice("which", which, WHICH)
    if not spec:
        raise OptionError(
            "checkpoint=PATH is required: a run folder (e.g. outputs/DATE/TIME), a .pt file or an MLflow run id"
        )
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return in_run_folder(path, which)
    if RUN_ID.match(spec):
        return in_run_folder(run_folder(spec, tracking_uri), which)
    if path.suffix == ".pt":
        raise OptionError(f"checkpoint={spec}: no such file")
    raise OptionError(
        f"checkpoint={spec}: no such file or folder, and not an MLflow run id (32 hex digits); "
        f"give a run folder (outputs/DATE/TIME), a .pt file or a run id"
    )


def _checkpoint_dir(run: Path) -> Path:
    """checkpoints/, or what the run's saved Hydra config set checkpoint.dir to."""
    saved = run / ".hydra" / "config.yaml"
    if saved.is_file():
        folder = OmegaConf.load(saved).get("checkpoint", {}).get("dir")
        if folder:
            return run / folder
    return run / "checkpoints"


def in_run_folder(folder: Path, which: str) -> Path:
    """`which`.pt of a run folder, or of a checkpoint folder given directly."""
    for candidate in (folder / f"{which}.pt", _checkpoint_dir(folder) / f"{which}.pt"):
        if candidate.is_file():
            return candidate
    ckpts = _checkpoint_dir(folder) if _checkpoint_dir(folder).is_dir() else folder
    found = sorted(p.name for p in ckpts.glob("*.pt"))
    if which == "best" and found:
        hint = "; best.pt is written only when a checkpoint's val loss is the lowest so far: use which=last"
    else:
        hint = f"; found: {', '.join(found)}" if found else "; the run has written no checkpoint"
    raise OptionError(f"checkpoint={folder}: no {which}.pt in {ckpts}{hint}")


def run_folder(run_id: str, tracking_uri: str = "") -> Path:
    """The run folder an MLflow run recorded (tag run_dir, else the folder of
    the checkpoint it resumed from)."""
    run, uri = mlflow_run(run_id, tracking_uri)
    tags = run.data.tags
    if RUN_DIR_TAG in tags:
        folder = Path(tags[RUN_DIR_TAG])
    elif "resumed_from" in tags:
        folder = Path(tags["resumed_from"]).parent
    else:
        raise OptionError(
            f"checkpoint={run_id}: MLflow run {run_id} in {uri} records no run folder (tag "
            f"{RUN_DIR_TAG}); give its run folder or .pt file instead"
        )
    if not folder.is_dir():
        raise OptionError(
            f"checkpoint={run_id}: the run's folder {folder} does not exist on this machine; "
            f"give the run folder or .pt file where it is now"
        )
    return folder


def mlflow_run(run_id: str, tracking_uri: str = ""):
    """(MLflow run, store URI); `tracking_uri` empty: $MLFLOW_TRACKING_URI,
    else ./mlflow.db, as for compare."""
    from lingmao.tracking.store import StoreError, open_store, store_uri

    if tracking_uri and "://" not in tracking_uri and Path(tracking_uri).is_file():
        tracking_uri = f"sqlite:///{Path(tracking_uri).resolve()}"  # the path of an mlflow.db
    uri = store_uri(tracking_uri or None)
    from mlflow.exceptions import MlflowException

    try:
        client = open_store(uri)
        run = client.get_run(run_id)
    except StoreError as e:
        raise OptionError(f"MLflow run {run_id}: {e}") from None
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise OptionError(
                f"no MLflow run {run_id} in {uri}; pass tracking_uri= (the store the run was "
                f"logged to, e.g. sqlite:///PATH/mlflow.db)"
            ) from None
        raise OptionError(f"MLflow store {uri}: {str(e.message).splitlines()[0]}") from None
    return run, uri


def launch_dir(checkpoint: Path) -> Path | None:
    """The folder the run was launched from (Hydra's runtime.cwd in the run
    folder's .hydra/hydra.yaml), where its default MLflow store lives."""
    for folder in list(checkpoint.resolve().parents)[:3]:
        saved = folder / ".hydra" / "hydra.yaml"
        if saved.is_file():
            cwd = OmegaConf.load(saved).hydra.runtime.get("cwd")
            return Path(cwd) if cwd else None
    return None
