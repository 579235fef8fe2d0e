"""MLflow stores: where one is, whether it answers, its experiments and
its runs' pages; the quiet, retried calls that the tracker and the spool
import share."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

_LOCKED_RETRIES = 8  # backoff 0.1 s doubling: ~25 s in all before a locked sqlite store counts as unreachable
_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
UI_URL_ENV = "LINGMAO_UI_URL"  # where it serves instead (`mlflow ui --port 8080`: http://127.0.0.1:8080)


class TrackingError(RuntimeError):
    """A user-facing problem with a store or a spool; the message says what to do."""


def resolve_uri(uri: str | None, launch_dir: Path) -> str:
    """Default `sqlite:///<launch dir>/mlflow.db`, made absolute so Hydra jobs,
    which each run in their own folder, all share one store."""
    if not uri:
        return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            return f"sqlite:///{(launch_dir / path).resolve()}"
    # A plain folder is MLflow's file store; anything with a scheme of two or
    # more letters (file:, databricks://..., uc:) or a bare profile name
    # (databricks, databricks-uc) is a store MLflow resolves itself.
    if uri in ("databricks", "databricks-uc") or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", uri):
        return uri
    return str((launch_dir / uri).resolve())


def store_uri(uri: str | None) -> str:
    """The store a reading command (compare, eval, generate) opens:
    tracking_uri=, else $MLFLOW_TRACKING_URI, else the tracker's default
    `sqlite:///<cwd>/mlflow.db`, made absolute as the tracker does, so the
    printed `mlflow ui` hint works from anywhere."""
    return resolve_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd())


class StoreError(LookupError):
    """A store the user named that is not there: one line, no traceback."""


def open_store(uri: str):
    """An MlflowClient on an existing store. Opening a missing sqlite file
    would silently create an empty store and then report "no runs"; say
    where we looked instead."""
    local = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else (uri if "://" not in uri else None)
    if local is not None and not Path(local).exists():
        raise StoreError(
            f"no MLflow store at {local} (tracking URI {uri}); run from the directory you "
            f"trained in, or pass tracking_uri=sqlite:///PATH/mlflow.db or a mlruns folder"
        )
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def quiet_mlflow() -> None:
    """MLflow's INFO lines ("Creating initial MLflow database tables", "Skip
    logging GPU metrics") would land in the middle of the progress bar; its
    warnings and errors still show. Call after MLflow is imported: its import
    sets its loggers' levels."""
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))


class _QuietLocked(logging.Filter):
    """MLflow logs a full traceback for every sqlite 'database is locked'
    before raising it; `_retry_locked` retries those, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietLocked())


def _retry_locked(fn, *args, **kwargs):
    """Parallel jobs write into one sqlite file. Writers queue on MLflow's 20 s
    busy timeout, but a transaction that read before it writes (log_batch reads
    the run first) gets 'database is locked' at once when waiting could
    deadlock (SQLite docs, sqlite3_busy_handler). Its write was rolled back:
    retry with exponential backoff and jitter."""
    for attempt in range(_LOCKED_RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "database is locked" not in str(e) or attempt == _LOCKED_RETRIES:
                raise
            time.sleep(0.1 * 2**attempt * (1 + random.random()))


def ensure_store(uri: str) -> None:
    """Create (migrate) a sqlite store once, under a file lock: parallel jobs
    that each find no store race on its schema migration and break it."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from mlflow.tracking import MlflowClient

        quiet_mlflow()
        MlflowClient(uri).search_experiments(max_results=1)


NOT_MLFLOW = "answered but is not an MLflow tracking server"


def unreachable(uri: str, timeout: float = 3.0) -> str | None:
    """Why an HTTP tracking server cannot take a run, or None if it can.
    MLflow's client retries an unreachable server for minutes before failing;
    one GET of /health (every `mlflow server` serves it) tells in seconds. A
    server that answers /health with an error must still speak MLflow's API."""
    if not uri.startswith(("http://", "https://")):
        return None
    health = uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        # A proxy in front of MLflow may not pass /health on: its API decides.
        return None if _speaks_mlflow(uri, timeout) else f"{NOT_MLFLOW} ({e.code} on {health})"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; MLflow's client has its own TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ...)
        return str(reason)
    return None


def _speaks_mlflow(uri: str, timeout: float) -> bool:
    """Whether the server answers MLflow's REST API: a JSON error names an
    `error_code` (an unknown experiment is a 404 with one); 401/403 ask for
    credentials the client has its own settings for."""
    api = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        urllib.request.urlopen(api, timeout=timeout).close()
        return True
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return True
        try:
            return "error_code" in json.loads(e.read(65536) or b"{}")
        except (ValueError, OSError):
            return False
    except (OSError, ValueError):
        return True  # no verdict: MLflow's client will say what is wrong


def store_problem(uri: str, why: str) -> str:
    """One line on a store the records cannot reach (`why` from `unreachable`, or a failed call)."""
    if why.startswith(NOT_MLFLOW):
        return f"MLflow store {uri} {why}"
    return f"MLflow store {uri} not reachable ({why})"


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment in a sqlite store keeps its artifacts: beside the
    store. MLflow's default is the current folder at creation, that is inside
    the first Hydra job's output folder, which every later run would write into."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides; a file store keeps them inside itself
    db = Path(uri[len("sqlite:///") :])
    folder = re.sub(r"[^\w.-]+", "_", experiment)
    if not folder.strip("."):  # "." or "..": not a folder of mlartifacts but the folder itself or its parent
        folder = folder.replace(".", "_")
    return (db.parent / "mlartifacts" / folder).as_uri()


def experiment_id(client, name: str) -> str:
    """Get or create; a parallel job may create it between our get and create."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return _retry_locked(
                client.create_experiment,
                name,
                artifact_location=artifact_root(client.tracking_uri, name),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
            f"or choose another with tracking.experiment_name=NAME"
        )
    return exp.experiment_id


def ui_base(uri: str) -> str:
    """Where the UI of the store `uri` serves: a server serves its own; for a
    local store, `mlflow ui` on $LINGMAO_UI_URL, else its default (port 5000)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return (os.environ.get(UI_URL_ENV) or _UI).rstrip("/")


def ui_url(uri: str, exp_id: str, search: str = "", view: str | None = None) -> str:
    """The experiment's runs. MLflow 3 opens an experiment on its GenAI view;
    this page holds the training runs. `view`: a shared view's id
    (tracking/view.py), the runs table with its filter, sort and columns;
    else the charts of the runs `search` (MLflow search syntax) selects."""
    if view:  # with any filter or sort parameter beside it the UI would ignore the view
        query = {"viewStateShareKey": view, "compareRunsMode": "TABLE"}
    else:
        query = {"searchFilter": search} if search else {}
        query["compareRunsMode"] = "CHART"
    query_string = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs?{query_string}"


def where(uri: str, exp_id: str, search: str = "") -> str:
    """How to look at the runs `search` selects: a link to their runs table
    (a shared view written into the experiment), on a server's own URL or
    after the `mlflow ui` command for a local store, with how to point the
    link at a UI on another port."""
    from lingmao.tracking.view import publish

    url = ui_url(uri, exp_id, search, publish(uri, exp_id, search, _retry_locked))
    if uri.startswith(("http://", "https://")):
        return f"open {url}"
    port = urllib.parse.urlsplit(ui_base(uri)).port
    serve = f" --port {port}" if port and port != 5000 else ""
    return (
        f"mlflow ui --backend-store-uri {uri}{serve}  then open {url}  "
        f"(UI on another port: {UI_URL_ENV}=http://127.0.0.1:PORT)"
    )
