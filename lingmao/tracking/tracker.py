"""MLflow: the one module the training code calls for tracking.

Each call only buffers or queues; the sender (`tracking.sender`, which says
why one thread and what it costs) takes the records to the store, or to the
spool when the store cannot take them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from lingmao.tracking.sender import Sender
from lingmao.tracking.spool import SPOOL_NAME
from lingmao.tracking.store import ui_url

_BATCH = 900  # buffered metrics that trigger a flush: one log_batch takes up to 1000
FLUSH_SECONDS = 10.0  # or this long since the last flush: slow steps still show in the UI as they happen


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
        called (the engine does after its first step) or the sender's
        _OPEN_DELAY has passed: imports are Python and hold the GIL, so beside
        the model build they would still delay the first step, while beside
        training (torch kernels release the GIL) they cost it little. Records
        queue until then; `run_id`, `experiment_id`, `flush(wait=True)` and
        `end()` open at once and wait, each at most `timeout` s once MLflow is
        imported."""
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.spool = Path(spool or SPOOL_NAME).resolve()
        self.seconds = 0.0  # time the training thread spent in tracking calls, reported as overhead
        self._buffer: list = []
        self._flushed_at = time.monotonic()
        self._lock = threading.Lock()  # the metric buffer
        self._sender = Sender(uri, experiment, run_name, self.spool, run_id, timeout, system_metrics)
        if enabled:
            self._sender.start()

    def start_sending(self) -> None:
        """Open the store now (the time-critical start-up is over)."""
        self._sender.open_now()

    @property
    def timeout(self) -> float:
        """The longest any call waits on the store; lowering it shortens the waits still to come."""
        return self._sender.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._sender.timeout = seconds

    @property
    def offline(self) -> str | None:
        """Why records go to the spool instead of the store; None while they reach it."""
        return self._sender.offline

    @property
    def errors(self) -> list[str]:
        """Records that even the spool could not take."""
        return self._sender.errors

    @property
    def client(self):
        """The MlflowClient of the open store; AttributeError if the store was never reached."""
        return self._sender.client

    @property
    def run_id(self) -> str | None:
        if self.enabled:
            self._sender.wait_open()
        return self._sender.run_id

    @property
    def experiment_id(self) -> str | None:
        if self.enabled:
            self._sender.wait_open()
        return self._sender.experiment_id

    # -- the training thread's calls: each only queues ---------------------

    def run_link(self) -> str:
        """The chart view of this run's curves once the run is open (never
        waits), else ""."""
        s = self._sender
        if not (self.enabled and s.opened and s.run_id and s.offline is None):
            return ""
        return ui_url(self.uri, s.experiment_id, f"attributes.run_id = '{s.run_id}'")

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
            self._sender.wait_idle()
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
        self._sender.stop_system()
        self.flush()
        self._put({"op": "end", "status": status, "time": int(time.time() * 1000)})
        self._sender.wait_idle()
        self._sender.close()

    def _put(self, rec: dict) -> None:
        t = time.perf_counter()
        self._sender.put(rec)
        self.seconds += time.perf_counter() - t
