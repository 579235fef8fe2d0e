"""MLflow: the one module that imports it.

Tracking never makes training wait on the store. Metrics are buffered and, at
flush points (evals, the end), handed with every other record to a sender
thread that calls `log_batch`: one `log_batch` of 500 metrics into sqlite took
0.1-0.2 s here, several percent of a tiny model's 100 steps.

A store that cannot be reached, at the start or in the middle of a run, costs
no data: from then on the records go to a JSONL spool in the run folder, the
user is told at once and at the end, and

    python -m lingmao.tracking import outputs/.../mlflow_spool.jsonl [--tracking-uri URI]

replays it into a store later.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SPOOL_NAME = "mlflow_spool.jsonl"
SYSTEM_INTERVAL = 10.0  # seconds between system-metric samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)
_BATCH = 900  # metrics per log_batch: MLflow accepts up to 1000
_PARAMS = 100  # params per log_batch: MLflow's limit
_QUEUE = 256  # records waiting for the sender before a log call blocks: bounded memory, nothing dropped
_LOCKED_RETRIES = 8  # backoff 0.1 s doubling: ~25 s in all before a locked sqlite store counts as unreachable
_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
_OPEN_DELAY = 20.0  # seconds the sender waits for start_sending() before it opens the store anyway


class TrackingError(RuntimeError):
    """A user-facing problem with a store or a spool; the message says what to do."""


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


def unreachable(uri: str, timeout: float = 3.0) -> str | None:
    """Why an HTTP tracking server does not answer, or None if it does.
    MLflow's client retries an unreachable server for minutes before failing;
    one GET of /health (every `mlflow server` serves it) tells in seconds."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, if not on /health (a proxy, say): the client will tell more
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; MLflow's client has its own TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ...)
        return str(reason)
    return None


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment in a sqlite store keeps its artifacts: beside the
    store. MLflow's default is the current folder at creation, that is inside
    the first Hydra job's output folder, which every later run would write into."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides; a file store keeps them inside itself
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).as_uri()


def experiment_id(client, name: str) -> str:
    """Get or create; a parallel job may create it between our get and create."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return _retry_locked(client.create_experiment, name,
                                 artifact_location=artifact_root(client.tracking_uri, name),
                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
                            f"or choose another with tracking.experiment_name=NAME")
    return exp.experiment_id


def ui_url(uri: str, exp_id: str, search: str = "") -> str:
    """The experiment's runs with their charts. MLflow 3 opens an experiment on
    its GenAI view; this page holds the training runs. `search` is a run filter
    (MLflow search syntax), kept in the URL's `searchFilter`."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else _UI
    query = {"searchFilter": search} if search else {}
    query["compareRunsMode"] = "CHART"
    return f"{base}/#/experiments/{exp_id}/runs?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def where(uri: str, exp_id: str, search: str = "") -> str:
    """How to look: a server's own URL, or the `mlflow ui` command for a local store."""
    url = ui_url(uri, exp_id, search)
    if uri.startswith(("http://", "https://")):
        return f"open {url}"
    return f"mlflow ui --backend-store-uri {uri}  then open {url}"


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


def launch_host() -> str:
    return os.uname().nodename


def sweep_id(sweep_dir: Path) -> str:
    """One id for every job of a multirun, readable ('2025-06-01_12-00-00-3fa2c1'
    for Hydra's default dir) and the same in every process and on every node
    that sees the same sweep folder."""
    sweep_dir = Path(sweep_dir).resolve()
    digest = hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:6]
    return f"{sweep_dir.parent.name}_{sweep_dir.name}-{digest}"


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
            time.sleep(0.1 * 2 ** attempt * (1 + random.random()))


def _send(client, run_id: str, rec: dict) -> None:
    """Apply one record (the spool's format) to a run: the live sender and the
    spool import share it."""
    from mlflow.entities import Metric, Param, RunTag

    op = rec["op"]
    if op == "metrics":
        metrics = [Metric(k, v, t, s) for k, v, t, s in rec["metrics"]]
        for i in range(0, len(metrics), _BATCH):
            _retry_locked(client.log_batch, run_id, metrics=metrics[i:i + _BATCH])
    elif op == "params":
        params = [Param(k, v) for k, v in rec["params"].items()]
        for i in range(0, len(params), _PARAMS):
            _retry_locked(client.log_batch, run_id, params=params[i:i + _PARAMS])
    elif op == "tags":
        _retry_locked(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
    elif op == "text":
        _retry_locked(client.log_text, run_id, rec["text"], rec["name"])
    elif op == "artifact":
        _retry_locked(client.log_artifact, run_id, rec["path"], rec.get("folder"))
    elif op == "end":
        _retry_locked(client.set_terminated, run_id, rec["status"], rec["time"])
    else:
        raise TrackingError(f"unknown spool record {op!r}")


def _import_hint(spool: Path, uri: str) -> str:
    return f"python -m lingmao.tracking import {spool} --tracking-uri {uri}"


class Tracker:
    """One MLflow run. A disabled tracker accepts every call and does nothing.

    Every record goes through one queue to one sender thread, so records keep
    their order (params before metrics, `end` last) whether they reach the
    store or the spool."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, enabled: bool = True,
                 spool: Path | None = None, system_metrics: bool = False, run_id: str | None = None):
        """`run_id`: a run to continue (a resumed checkpoint's), if the store has it.

        Returns at once. Importing MLflow and opening the store and the run
        (~3 s here) happen on the sender thread once `start_sending()` is
        called (the engine does after its first step) or _OPEN_DELAY has
        passed: imports are Python and hold the GIL, so beside the model build
        they would still delay the first step, while beside training (torch
        kernels release the GIL) they cost it little. Records queue until
        then; `run_id`, `experiment_id` and `end()` open at once and wait."""
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self._run_id: str | None = run_id
        self._experiment_id: str | None = None
        self.spool = Path(spool or SPOOL_NAME).resolve()
        self.offline: str | None = None  # why records go to the spool instead of the store
        self.seconds = 0.0  # time the training thread spent in tracking calls, reported as overhead
        self.send_seconds = 0.0  # time the sender thread spent sending or spooling (overlaps training)
        self.errors: list[str] = []
        self._buffer: list = []
        self._lock = threading.Lock()
        self._spooled = 0
        self._system = None
        self._want_system = system_metrics
        self._go = threading.Event()  # may open the store now
        self._started = threading.Event()  # the store and the run are open, or the spool took over
        if not enabled:
            return
        self._start_ms = int(time.time() * 1000)
        self._queue: queue.Queue = queue.Queue(_QUEUE)
        self._sender = threading.Thread(target=self._send_loop, name="lingmao-tracking", daemon=True)
        self._sender.start()

    def start_sending(self) -> None:
        """Open the store now (the time-critical start-up is over)."""
        self._go.set()

    def _wait_open(self) -> None:
        if self.enabled:
            self._go.set()
            self._started.wait()

    @property
    def run_id(self) -> str | None:
        self._wait_open()
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        self._wait_open()
        return self._experiment_id

    def _open(self) -> None:
        """The sender thread's first job: the store, the run, system metrics."""
        why = unreachable(self.uri)
        if why is None:
            try:
                from mlflow.tracking import MlflowClient

                ensure_store(self.uri)
                self.client = MlflowClient(self.uri)
                if not self._reopen():
                    self._experiment_id = experiment_id(self.client, self.experiment)
                    self._run_id = _retry_locked(self.client.create_run, self._experiment_id,
                                                 run_name=self.run_name, start_time=self._start_ms).info.run_id
            except Exception as e:  # any failure to start a run: train anyway, into the spool
                why = f"{type(e).__name__}: {e}"
        if why is not None:
            self._go_offline(why)
        if self._want_system:
            try:
                self._system = _SystemMetrics(self)
            except Exception as e:  # psutil missing, say: the run goes on without them
                print(f"warning: no system metrics: {type(e).__name__}: {e}", file=sys.stderr)
        self._started.set()

    def _reopen(self) -> bool:
        from mlflow.exceptions import MlflowException

        if not self._run_id:
            return False
        try:
            run = self.client.get_run(self._run_id)
        except MlflowException:  # the checkpoint's run lives in another store
            print(f"note: MLflow run {self._run_id} of the resumed checkpoint is not in {self.uri}; "
                  f"starting a new run", file=sys.stderr)
            self._run_id = None
            return False
        _retry_locked(self.client.update_run, self._run_id, status="RUNNING")
        self._experiment_id = run.info.experiment_id
        return True

    # -- the training thread's calls: each only queues ---------------------

    def ui_url(self) -> str:
        return ui_url(self.uri, self.experiment_id) if self.enabled and self.experiment_id else ""

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._put({"op": "params", "params": {k: str(v)[:6000] for k, v in flatten(params).items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        t = time.perf_counter()
        ms = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend((k, float(v), ms, step) for k, v in metrics.items())
            full = len(self._buffer) >= _BATCH
        self.seconds += time.perf_counter() - t
        if full:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered metrics to the sender; `wait`: until everything
        queued so far is in the store or the spool (before a checkpoint, so a
        run killed after it has lost no metric from before it)."""
        if not self.enabled:
            return
        with self._lock:
            batch, self._buffer = self._buffer, []
        if batch:
            self._put({"op": "metrics", "metrics": batch})
        if wait:
            t = time.perf_counter()
            self._queue.join()
            self.seconds += time.perf_counter() - t

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._put({"op": "text", "text": text, "name": name})

    def log_dict(self, data: dict, name: str) -> None:
        self.log_text(json.dumps(data, ensure_ascii=False, indent=2, default=str), name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._put({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def end(self, status: str = "FINISHED") -> None:
        """Send what is left and wait for it; say where anything that could
        not be sent went."""
        if not self.enabled:
            return
        self._wait_open()
        if self._system:
            self._system.stop()
        self.flush()
        self._put({"op": "end", "status": status, "time": int(time.time() * 1000)})
        self._queue.put(None)
        self._sender.join()
        if self.offline:
            print(f"warning: MLflow store {self.uri} was not reachable ({self.offline}); {self._spooled} "
                  f"record(s) are in {self.spool}. Import them when it is back:\n  "
                  f"{_import_hint(self.spool, self.uri)}", file=sys.stderr)
        for err in self.errors:
            print(f"error: tracking record lost: {err}", file=sys.stderr)

    def _put(self, rec: dict) -> None:
        t = time.perf_counter()
        self._queue.put(rec)  # blocks only when _QUEUE records wait: the store is far behind
        self.seconds += time.perf_counter() - t

    # -- the sender thread ----------------------------------------------------

    def _send_loop(self) -> None:
        self._go.wait(_OPEN_DELAY)
        self._open()
        while (rec := self._queue.get()) is not None:
            t = time.perf_counter()
            try:
                if self.offline is None:
                    try:
                        _send(self.client, self._run_id, rec)
                    except Exception as e:  # the store went away: the spool takes this record and the rest
                        self._go_offline(f"{type(e).__name__}: {str(e)[:300]}")
                if self.offline is not None:
                    self._write_spool(rec)
            except Exception as e:  # even the local disk failed: say so at the end
                self.errors.append(f"{rec['op']}: {type(e).__name__}: {e}")
            self.send_seconds += time.perf_counter() - t
            self._queue.task_done()

    def _go_offline(self, why: str) -> None:
        self.offline = why
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        header = {"op": "start", "uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                  "run_id": self._run_id, "start_ms": self._start_ms, "reason": why}
        with open(self.spool, "a", encoding="utf-8") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
        where_to = f"run {self._run_id} continues in" if self._run_id else "records go to"
        print(f"warning: MLflow store {self.uri} not reachable ({why}); training goes on, {where_to} "
              f"the spool {self.spool}. Import it later with:\n  {_import_hint(self.spool, self.uri)}",
              file=sys.stderr)

    def _write_spool(self, rec: dict) -> None:
        if rec["op"] == "artifact":  # copy: the file may be gone or changed by import time
            src = Path(rec["path"])
            dst = self.spool.parent / "mlflow_spool_artifacts" / str(self._spooled) / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            rec = {**rec, "path": str(dst.relative_to(self.spool.parent))}
        with open(self.spool, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._spooled += 1


class _SystemMetrics:
    """CPU, RAM, disk, network and, where nvidia-ml-py finds a GPU, GPU use,
    measured by MLflow's own system-metrics monitors (psutil, pynvml) every
    SYSTEM_INTERVAL seconds and sent through the tracker, so they reach the
    spool too. MLflow's SystemMetricsMonitor thread would send them itself,
    and stops for good at the first failed send."""

    def __init__(self, tracker: Tracker):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker = tracker
        self.monitor = SystemMetricsMonitor(tracker._run_id or "spooled", sampling_interval=SYSTEM_INTERVAL,
                                            tracking_uri=tracker.uri)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lingmao-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> dict:
        self.monitor.collect_metrics()
        metrics = self.monitor.aggregate_metrics()
        for m in self.monitor.monitors:
            m.clear_metrics()
        return metrics

    def _loop(self) -> None:
        try:
            self._sample()  # psutil's first CPU reading covers no interval: discard it
            step = 0
            while not self._stop.wait(float(self.monitor.sampling_interval)):
                ms = int(time.time() * 1000)
                rec = [(f"system/{k}", float(v), ms, step) for k, v in self._sample().items()]
                self.tracker._queue.put({"op": "metrics", "metrics": rec})
                step += 1
        except Exception as e:  # a monitor failing (a GPU gone) ends system metrics, never training
            print(f"warning: system metrics stopped: {type(e).__name__}: {e}", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- replaying a spool ------------------------------------------------------

def read_spool(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TrackingError(f"no spool at {path} (runs that could not reach their store leave {SPOOL_NAME} "
                            f"in their run folder)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break  # a last line cut short by a killed process: everything before it still counts
            raise TrackingError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not records or records[0].get("op") != "start":
        raise TrackingError(f"{path}:1: not a lingmao MLflow spool (its first record must be 'start')")
    return records


def _pending(records: list[dict]) -> list[dict]:
    """The records after the last 'imported' mark: a spool can be appended to
    again (a later run in the same folder) and imported again."""
    marks = [i for i, r in enumerate(records) if r["op"] == "imported"]
    return records[marks[-1] + 1:] if marks else records


def import_spool(path: Path, uri: str | None = None) -> tuple[str, str]:
    """Replay a spool into a store; returns (uri, last run id). A segment
    whose run exists in that store continues it, otherwise a new run is made.
    What was imported is marked so, and never imported twice."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = Path(path).resolve()
    records = read_spool(path)
    pending = _pending(records)
    if not pending:
        done = records[-1]
        raise TrackingError(f"{path} was already imported into {done['uri']} as run {done['run_id']}")
    if pending[0]["op"] != "start":
        raise TrackingError(f"{path}: the records after line {len(records) - len(pending)} lack their 'start' record")
    uri = uri or pending[0]["uri"]
    why = unreachable(uri)
    if why is not None:
        raise TrackingError(f"MLflow store {uri} is still not reachable ({why}); start it or pass "
                            f"--tracking-uri (e.g. sqlite:///mlflow.db)")
    ensure_store(uri)
    client = MlflowClient(uri)
    run_id = None
    for rec in pending:
        if rec["op"] == "start":
            run_id = rec.get("run_id")
            if run_id:
                try:
                    client.get_run(run_id)
                except MlflowException:
                    run_id = None  # a different store from the one the run started in
            if not run_id:
                exp_id = experiment_id(client, rec["experiment"])
                run_id = client.create_run(exp_id, run_name=rec["run_name"], start_time=rec["start_ms"]).info.run_id
            client.set_tag(run_id, "lingmao.spool", str(path))
            continue
        if rec["op"] == "artifact":
            rec = {**rec, "path": str(path.parent / rec["path"])}
        _send(client, run_id, rec)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"op": "imported", "uri": uri, "run_id": run_id, "time": int(time.time() * 1000)}) + "\n")
    return uri, run_id


def pending_spools(folder: Path) -> list[Path]:
    """Spools under `folder` (a run or a sweep folder) with records not imported yet."""
    out = []
    for path in sorted(Path(folder).glob(f"**/{SPOOL_NAME}")):
        try:
            if _pending(read_spool(path)):
                out.append(path)
        except TrackingError:
            out.append(path)
    return out


def sweep_report(uri: str, experiment: str, sweep: str, sweep_dir: Path) -> str:
    """What a multirun left in MLflow: its runs by status and where to see
    them together, or the spools to import."""
    lines = []
    spools = pending_spools(sweep_dir)
    if spools:
        lines.append(f"{len(spools)} job(s) could not reach {uri}; import their spools when it is back:\n  "
                     f"python -m lingmao.tracking import {' '.join(str(p) for p in spools)} --tracking-uri {uri}")
    why = unreachable(uri)
    if why is not None:
        return "\n".join(lines or [f"MLflow store {uri} not reachable ({why})"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return "\n".join(lines)
    search = f"tags.`sweep.id` = '{sweep}'"
    runs = client.search_runs([exp.experiment_id], search, max_results=1000)
    status: dict[str, int] = {}
    for r in runs:
        status[r.info.status] = status.get(r.info.status, 0) + 1
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(status.items()))
    lines.insert(0, f"mlflow: sweep {sweep}: {len(runs)} run(s) in {uri} ({counts or 'none'}); group them in "
                    f"the UI by tag sweep.id, or filter {search}\n  {where(uri, exp.experiment_id, search)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingmao.tracking",
                                     description="lingmao's MLflow tracking: replay spools of runs that "
                                                 "could not reach their store.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help=f"replay spool(s) ({SPOOL_NAME}) into an MLflow store")
    imp.add_argument("spools", nargs="+", type=Path, metavar="SPOOL")
    imp.add_argument("--tracking-uri", default=None,
                     help="the store to import into (default: the one each run could not reach, "
                          "as written in its spool)")
    args = parser.parse_args(argv)
    uri = resolve_uri(args.tracking_uri, Path.cwd()) if args.tracking_uri else None
    failed = 0
    for spool in args.spools:
        try:
            store, run_id = import_spool(spool, uri)
        except (TrackingError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"imported {spool} into {store} run {run_id}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
