"""The one thread that takes a run's tracking records to the MLflow store, or
to the spool when the store cannot take them.

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

import sys
import threading
import time
from collections import deque
from pathlib import Path

from lingmao.tracking.orphans import Marker, close_orphans
from lingmao.tracking.provenance import source_tags
from lingmao.tracking.spool import Spool, apply, import_hint
from lingmao.tracking.store import _retry_locked, ensure_store, experiment_id, quiet_mlflow, store_problem, unreachable
from lingmao.tracking.system import SystemMetrics

_QUEUE = 256  # records waiting for the sender before a log call waits (bounded memory)
_OPEN_DELAY = 20.0  # seconds the sender waits for open_now() before it opens the store anyway
_IMPORT_LIMIT = 120.0  # seconds allowed for importing MLflow, which is not waiting on the store


class Sender:
    """The tracker's sender thread, its bounded queue, and the store, run and
    spool it sends to. `put` and the waits are the tracker's side; the rest
    runs on the thread. Until the store and the run are open, `run_id` is
    the run to continue, if any."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        spool: Path,
        run_id: str | None,
        timeout: float,
        system_metrics: bool,
    ):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.timeout = timeout
        self.run_id = run_id
        self.experiment_id: str | None = None
        self._spool = Spool(spool)
        self.offline: str | None = None  # why records go to the spool instead of the store
        self.send_seconds = 0.0  # time the sender thread spent sending or spooling (overlaps training)
        self.errors: list[str] = []
        self._cv = threading.Condition()  # the queue, the record in flight, the spool, the state below
        self._records: deque = deque()
        self._inflight: dict | None = None
        self.opened = False  # the store and the run are open, or the spool took over
        self._stuck = False  # the store stopped answering: the spool has everything from then on
        self._closing = False
        self._system = None
        self._want_system = system_metrics
        self._marker: Marker | None = None  # the open run's claim, for a later start to see if this process dies
        self._go = threading.Event()  # may open the store now
        self._imported = threading.Event()  # MLflow is imported: from now on waits are on the store

    def start(self) -> None:
        self._start_ms = int(time.time() * 1000)
        self._thread = threading.Thread(target=self._send_loop, name="lingmao-tracking", daemon=True)
        self._thread.start()

    # -- the tracker's side --------------------------------------------------

    def open_now(self) -> None:
        self._go.set()

    def wait_open(self) -> None:
        self._wait(lambda: self.opened)

    def wait_idle(self) -> None:
        """Until everything queued so far is in the store or the spool."""
        self._wait(self._idle)

    def put(self, rec: dict) -> None:
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

    def stop_system(self) -> None:
        """No more system metrics: their last record goes before the run's end."""
        with self._cv:
            self._want_system, system = False, self._system
        if system:
            system.stop(self.timeout)

    def close(self) -> None:
        """Let the thread go, and say where anything that could not be sent went."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._marker:
            self._marker.release()
        if self.offline:
            print(
                f"warning: {store_problem(self.uri, self.offline)}; {self._spool.count} "
                f"record(s) are in {self._spool.path}; import them when it is back: "
                f"{import_hint(self._spool.path, self.uri)}",
                file=sys.stderr,
            )
        for err in self.errors:
            print(f"error: tracking record lost: {err}", file=sys.stderr)

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
        return self.opened and not self._records and self._inflight is None

    # -- the sender thread ---------------------------------------------------

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
                apply(self.client, self.run_id, rec)
                return
            except Exception as e:  # the store went away: the spool takes this record and the rest
                why = _brief(e)
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
                self._close_orphans(client)
                run = self._reopen(client) or self._create(client)
                self._marker = Marker.claim(self.uri, run[0], self.run_name)
            except Exception as e:  # any failure to start a run: train anyway, into the spool
                why = _brief(e)
        # Without a store, system metrics still import MLflow: that is not waiting on a store either.
        system = SystemMetrics.make(self) if self._want_system else None
        self._imported.set()
        with self._cv:
            if not self._stuck:  # else given up on while opening: the spool's start record holds
                if client is not None:  # else no `client` at all: the store was never reached
                    self.client = client
                self.run_id, self.experiment_id = run or (None, None)
                if why is not None:
                    self._go_offline(why)
            self._system = system if self._want_system and not self._stuck else None
            self.opened = True
            self._cv.notify_all()
        if self._system:
            self._system.start()

    def _close_orphans(self, client) -> None:
        """Runs of this store left RUNNING by a process that died (tracking/orphans.py)."""
        try:
            for note in close_orphans(client, self.uri, keep=self.run_id):
                print(note, file=sys.stderr)
        except Exception as e:  # their state is not this run's business: it trains and tracks anyway
            print(f"warning: could not close runs left open by dead processes: {_brief(e)}", file=sys.stderr)

    def _reopen(self, client) -> tuple[str, str] | None:
        from mlflow.exceptions import MlflowException

        if not self.run_id:
            return None
        try:
            run = client.get_run(self.run_id)
        except MlflowException:  # the checkpoint's run lives in another store
            print(
                f"note: MLflow run {self.run_id} of the resumed checkpoint is not in {self.uri}; starting a new run",
                file=sys.stderr,
            )
            return None
        _retry_locked(client.update_run, self.run_id, status="RUNNING")
        return self.run_id, run.info.experiment_id

    def _create(self, client) -> tuple[str, str]:
        exp = experiment_id(client, self.experiment)
        run = _retry_locked(
            client.create_run, exp, run_name=self.run_name, start_time=self._start_ms, tags=source_tags()
        )
        return run.info.run_id, exp

    # -- the spool: each called holding the lock ----------------------------

    def _give_up(self, why: str) -> None:
        """The store does not answer: everything not yet sent goes to the spool,
        now and from now on."""
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
        self.offline = why
        self._spool.start(
            {
                "uri": self.uri,
                "experiment": self.experiment,
                "run_name": self.run_name,
                "run_id": self.run_id,
                "start_ms": self._start_ms,
                "reason": why,
                "tags": None if self.run_id else source_tags(),
            }
        )
        where_to = f"run {self.run_id} continues in" if self.run_id else "records go to"
        print(
            f"warning: {store_problem(self.uri, why)}; training goes on, {where_to} "
            f"the spool {self._spool.path}; import it later: {import_hint(self._spool.path, self.uri)}",
            file=sys.stderr,
        )

    def _to_spool(self, rec: dict) -> None:
        try:
            self._spool.write(rec)
        except Exception as e:  # even the local disk failed: say so at the end
            self.errors.append(f"{rec['op']}: {type(e).__name__}: {e}")


def _brief(e: Exception) -> str:
    """An error in one short line: a server's reply can be a whole HTML page."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
