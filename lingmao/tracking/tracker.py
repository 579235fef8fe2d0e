"""MLflow: the one module the training code calls for tracking.

Tracking never makes training wait on the store. Metrics are buffered and, at
flush points (evals, the end), handed with every other record to one sender
thread that applies them in order (`tracking_spool.apply`). The training
thread pays a list append per log call and a queue append per flush (0.03 ms
and 0.07 ms here, medians). MLflow's own `synchronous=False` logging was
measured instead: 0.2 ms per `log_batch` call and 0.45 ms per
`mlflow.log_metrics` call, up to 2% of a 20 ms step; its ten worker threads
do not keep records in order; a batch that fails is logged and dropped; and
its waits have no bound, not even at exit (a process with one batch pending
on a hung server did not exit in 40 s).

No wait on the store lasts longer than the tracker's `timeout`. A store that
cannot be reached, at the start or in the middle of a run, or that stops
answering, costs no data: from then on the records go to a JSONL spool in the
run folder, the user is told in one line at once and again at the end, and

    python -m lingmao.tracking import outputs/.../mlflow_spool.jsonl [--tracking-uri URI]

replays it into a store later.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from lingmao.tracking.spool import (
    SPOOL_NAME,
    Spool,
    apply,
    import_hint,
    import_spool,
    main,
    pending_spools,
    read_spool,
    sweep_report,
)
from lingmao.tracking.store import (
    TrackingError,
    _retry_locked,
    ensure_store,
    experiment_id,
    quiet_mlflow,
    resolve_uri,
    ui_url,
    unreachable,
    where,
)
from lingmao.tracking.system import SystemMetrics

__all__ = [
    "SPOOL_NAME",
    "Tracker",
    "TrackingError",
    "ensure_store",
    "import_spool",
    "main",
    "pending_spools",
    "read_spool",
    "resolve_uri",
    "sweep_id",
    "sweep_report",
    "unreachable",
    "where",
]

_BATCH = 900  # buffered metrics that trigger a flush: one log_batch takes up to 1000
FLUSH_SECONDS = 10.0  # or this long since the last flush: slow steps still show in the UI as they happen
_QUEUE = 256  # records waiting for the sender before a log call waits (bounded memory)
_OPEN_DELAY = 20.0  # seconds the sender waits for start_sending() before it opens the store anyway
_IMPORT_LIMIT = 120.0  # seconds allowed for importing MLflow, which is not waiting on the store


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


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, which its fluent `start_run` sets and a
    client-made run lacks, and lingmao's version. Built without importing
    MLflow so that a spooled run carries them too. The commit is that of the
    lingmao code that ran, when it runs from a git checkout."""
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": sys.argv[0] or "python",
        "mlflow.source.type": "LOCAL",
    }
    commit = git_state(Path(__file__).resolve().parent).get("git.commit")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["lingmao.version"] = importlib.metadata.version("lingmao")
    except importlib.metadata.PackageNotFoundError:
        pass  # run from a source tree that was never installed
    return tags


class Tracker:
    """One MLflow run. A disabled tracker accepts every call and does nothing.

    Every record goes through one queue to one sender thread, so records keep
    their order (params before metrics, `end` last) whether they reach the
    store or the spool. No call waits more than `timeout` seconds for the
    store: one that has not answered by then (a server that accepts
    connections and hangs) is given up on, and what was not sent, the record
    in flight included, goes to the spool with one warning line, as does every
    later record. A record in flight that the store did take after all is
    stored once on import: MLflow skips exact duplicates."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        enabled: bool = True,
        spool: Path | None = None,
        system_metrics: bool = False,
        run_id: str | None = None,
        timeout: float = 30.0,
    ):
        """`run_id`: a run to continue (a resumed checkpoint's), if the store has it.

        Returns at once. Importing MLflow and opening the store and the run
        (~3 s here) happen on the sender thread once `start_sending()` is
        called (the engine does after its first step) or _OPEN_DELAY has
        passed: imports are Python and hold the GIL, so beside the model build
        they would still delay the first step, while beside training (torch
        kernels release the GIL) they cost it little. Records queue until
        then; `run_id`, `experiment_id`, `flush(wait=True)` and `end()` open
        at once and wait, each at most `timeout` s once MLflow is imported."""
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.timeout = timeout
        self._run_id: str | None = run_id
        self._experiment_id: str | None = None
        self.spool = Path(spool or SPOOL_NAME).resolve()
        self._spool = Spool(self.spool)
        self.offline: str | None = None  # why records go to the spool instead of the store
        self.seconds = 0.0  # time the training thread spent in tracking calls, reported as overhead
        self.send_seconds = 0.0  # time the sender thread spent sending or spooling (overlaps training)
        self.errors: list[str] = []
        self._buffer: list = []
        self._flushed_at = time.monotonic()
        self._lock = threading.Lock()  # the metric buffer
        self._cv = threading.Condition()  # the queue, the record in flight, the spool, the state below
        self._records: deque = deque()
        self._inflight: dict | None = None
        self._opened = False  # the store and the run are open, or the spool took over
        self._stuck = False  # the store stopped answering: the spool has everything from then on
        self._closing = False
        self._system = None
        self._want_system = system_metrics
        self._go = threading.Event()  # may open the store now
        self._imported = threading.Event()  # MLflow is imported: from now on waits are on the store
        if not enabled:
            return
        self._start_ms = int(time.time() * 1000)
        self._sender = threading.Thread(target=self._send_loop, name="lingmao-tracking", daemon=True)
        self._sender.start()

    def start_sending(self) -> None:
        """Open the store now (the time-critical start-up is over)."""
        self._go.set()

    def _wait(self, done) -> bool:
        """Until `done()` holds (checked under the lock), at most `timeout` s
        once MLflow is imported; then give the store up. False if given up."""
        self._go.set()
        self._imported.wait(_IMPORT_LIMIT)
        with self._cv:
            if self._cv.wait_for(lambda: self._stuck or done(), self.timeout):
                return not self._stuck
            self._give_up(f"no answer within {self.timeout:g} s")
            return False

    def _idle(self) -> bool:
        return self._opened and not self._records and self._inflight is None

    @property
    def run_id(self) -> str | None:
        if self.enabled:
            self._wait(lambda: self._opened)
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        if self.enabled:
            self._wait(lambda: self._opened)
        return self._experiment_id

    # -- the training thread's calls: each only queues ---------------------

    def run_link(self) -> str:
        """The chart view of this run's curves once the run is open (never
        waits), else ""."""
        if not (self.enabled and self._opened and self._run_id and self.offline is None):
            return ""
        return ui_url(self.uri, self._experiment_id, f"attributes.run_id = '{self._run_id}'")

    def ui_url(self) -> str:
        return ui_url(self.uri, self.experiment_id) if self.enabled and self.experiment_id else ""

    def log_params(self, params: dict[str, Any], step: int | None = None) -> None:
        """Nested dicts become dotted keys. MLflow params cannot change: on a
        resumed run, a key whose value changed keeps its first value and the
        new one is logged as `resumed.<step>.<key>` (see tracking_spool._params)."""
        if self.enabled:
            self._put({"op": "params", "step": step, "params": {k: str(v)[:6000] for k, v in flatten(params).items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_input_dataset(
        self,
        name: str,
        digest: str,
        source: str,
        n_records: int | None = None,
        context: str = "training",
        profile: dict | None = None,
        source_type: str | None = None,
    ) -> None:
        """Record the corpus as the run's dataset input (the UI's Datasets
        column): `digest` identifies its content (MLflow keeps 36 characters),
        `source` where it came from (a path, an http(s):// URL, hf://NAME for
        the Hugging Face hub), `profile` any summary numbers."""
        if not self.enabled:
            return
        if source_type is None:  # MLflow's names: its HuggingFaceDatasetSource says "hugging_face"
            scheme = source.split("://")[0] if "://" in source else "local"
            source_type = {"https": "http", "hf": "hugging_face"}.get(scheme, scheme)
        prof = {**({"num_records": n_records} if n_records is not None else {}), **(profile or {})}
        self._put(
            {
                "op": "dataset",
                "dataset": {
                    "name": name,
                    "digest": digest[:36],
                    "source": source,
                    "source_type": source_type,
                    "context": context,
                    "profile": prof,
                },
            }
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        t = time.perf_counter()
        ms = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend((k, float(v), ms, step) for k, v in metrics.items())
            full = len(self._buffer) >= _BATCH or time.monotonic() - self._flushed_at >= FLUSH_SECONDS
        self.seconds += time.perf_counter() - t
        if full:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered metrics to the sender; `wait`: until everything
        queued so far is in the store or the spool (before a checkpoint, so a
        run killed after it has lost no metric from before it), at most
        `timeout` s, after which the spool takes what is left."""
        if not self.enabled:
            return
        with self._lock:
            batch, self._buffer, self._flushed_at = self._buffer, [], time.monotonic()
        if batch:
            self._put({"op": "metrics", "metrics": batch})
        if wait:
            t = time.perf_counter()
            self._wait(self._idle)
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
        """Send what is left and wait for it, at most `timeout` s; say where
        anything that could not be sent went."""
        if not self.enabled:
            return
        with self._cv:
            self._want_system, system = False, self._system
        if system:
            system.stop(self.timeout)
        self.flush()
        self._put({"op": "end", "status": status, "time": int(time.time() * 1000)})
        self._wait(self._idle)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self.offline:
            print(
                f"warning: MLflow store {self.uri} was not reachable ({self.offline}); {self._spool.count} "
                f"record(s) are in {self.spool}; import them when it is back: "
                f"{import_hint(self.spool, self.uri)}",
                file=sys.stderr,
            )
        for err in self.errors:
            print(f"error: tracking record lost: {err}", file=sys.stderr)

    def _put(self, rec: dict, timed: bool = True) -> None:
        t = time.perf_counter()
        with self._cv:
            full = len(self._records) >= _QUEUE and not self._stuck
        if full:  # the store is far behind: wait for room, as long as any wait on it
            self._wait(lambda: len(self._records) < _QUEUE)
        with self._cv:
            if self._stuck:
                self._to_spool(rec)
            else:
                self._records.append(rec)
                self._cv.notify_all()
        if timed:
            self.seconds += time.perf_counter() - t

    # -- the sender thread, and the spool -----------------------------------

    def _send_loop(self) -> None:
        self._go.wait(_OPEN_DELAY)
        self._open()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._records or self._closing or self._stuck)
                if self._stuck or not self._records:
                    return
                rec = self._inflight = self._records.popleft()
            t = time.perf_counter()
            self._deliver(rec)
            self.send_seconds += time.perf_counter() - t
            with self._cv:
                if self._inflight is rec:
                    self._inflight = None
                self._cv.notify_all()

    def _deliver(self, rec: dict) -> None:
        why = None
        if self.offline is None:
            try:
                apply(self.client, self._run_id, rec)
                return
            except Exception as e:  # the store went away: the spool takes this record and the rest
                why = f"{type(e).__name__}: {str(e)[:300]}"
        with self._cv:
            if self._inflight is not rec:
                return  # given up on while it was being sent: the spool has it
            if self.offline is None:
                self._go_offline(why)
            self._to_spool(rec)

    def _open(self) -> None:
        """The sender thread's first job: the store, the run, system metrics."""
        why, client, run = unreachable(self.uri), None, None
        if why is None:
            try:
                from mlflow.tracking import MlflowClient

                quiet_mlflow()
                self._imported.set()
                ensure_store(self.uri)
                client = MlflowClient(self.uri)
                run = self._reopen(client) or self._create(client)
            except Exception as e:  # any failure to start a run: train anyway, into the spool
                why = f"{type(e).__name__}: {e}"
        self._imported.set()
        system = SystemMetrics.make(self) if self._want_system else None
        with self._cv:
            if not self._stuck:  # else given up on while opening: the spool's start record holds
                if client is not None:
                    self.client = client
                self._run_id, self._experiment_id = run or (None, None)
                if why is not None:
                    self._go_offline(why)
            self._system = system if self._want_system and not self._stuck else None
            self._opened = True
            self._cv.notify_all()
        if self._system:
            self._system.start()

    def _reopen(self, client) -> tuple[str, str] | None:
        from mlflow.exceptions import MlflowException

        if not self._run_id:
            return None
        try:
            run = client.get_run(self._run_id)
        except MlflowException:  # the checkpoint's run lives in another store
            print(
                f"note: MLflow run {self._run_id} of the resumed checkpoint is not in {self.uri}; starting a new run",
                file=sys.stderr,
            )
            return None
        _retry_locked(client.update_run, self._run_id, status="RUNNING")
        return self._run_id, run.info.experiment_id

    def _create(self, client) -> tuple[str, str]:
        exp = experiment_id(client, self.experiment)
        run = _retry_locked(
            client.create_run, exp, run_name=self.run_name, start_time=self._start_ms, tags=source_tags()
        )
        return run.info.run_id, exp

    def _give_up(self, why: str) -> None:
        """The store does not answer: everything not yet sent goes to the spool,
        now and from now on. Called holding the lock."""
        self._stuck = True
        if self.offline is None:
            self._go_offline(why)
        pending = ([self._inflight] if self._inflight else []) + list(self._records)
        self._inflight = None
        self._records.clear()
        for rec in pending:
            self._to_spool(rec)
        self._cv.notify_all()

    def _go_offline(self, why: str) -> None:
        """Called holding the lock."""
        self.offline = why
        self._spool.start(
            {
                "uri": self.uri,
                "experiment": self.experiment,
                "run_name": self.run_name,
                "run_id": self._run_id,
                "start_ms": self._start_ms,
                "reason": why,
                "tags": None if self._run_id else source_tags(),
            }
        )
        where_to = f"run {self._run_id} continues in" if self._run_id else "records go to"
        print(
            f"warning: MLflow store {self.uri} not reachable ({why}); training goes on, {where_to} "
            f"the spool {self.spool}; import it later: {import_hint(self.spool, self.uri)}",
            file=sys.stderr,
        )

    def _to_spool(self, rec: dict) -> None:
        """Called holding the lock."""
        try:
            self._spool.write(rec)
        except Exception as e:  # even the local disk failed: say so at the end
            self.errors.append(f"{rec['op']}: {type(e).__name__}: {e}")
