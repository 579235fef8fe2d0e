"""Runs whose process died without closing them (SIGKILL, the OOM killer, a
node gone): they would stay RUNNING in the store for ever.

Each open run has a marker file in the lingmao cache that its process holds
locked (flock) for as long as it lives; the OS drops the lock when the process
dies, however it dies. A marker that can be locked therefore belongs to a dead
process, and the next tracker that opens the same store marks its run KILLED.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from lingmao.tracking.store import _retry_locked

REGISTRY = "open_runs"  # under the lingmao cache ($LINGMAO_CACHE, default ~/.cache/lingmao)


def _registry() -> Path:
    from lingmao.data import cache_root

    return cache_root(None) / REGISTRY


def _prefix(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


class Marker:
    """This process's claim on the run it has open: a locked file that says
    which run, in which store, held by which process."""

    def __init__(self, path: Path, file):
        self.path, self._file = path, file

    @classmethod
    def claim(cls, uri: str, run_id: str, run_name: str) -> Marker | None:
        """Written under a temporary name, locked, then renamed into place, so
        that a scan never finds a marker that is not yet locked."""
        try:
            folder = _registry()
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim-")
            f = os.fdopen(fd, "w")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            facts = {
                "uri": uri,
                "run_id": run_id,
                "run_name": run_name,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
            f.write(json.dumps(facts))
            f.flush()
            path = folder / f"{_prefix(uri)}-{run_id}.json"
            os.replace(tmp, path)
            return cls(path, f)
        except OSError as e:  # a read-only cache: the run goes on, unguarded
            print(f"warning: cannot record the open MLflow run in {_registry()}: {e}", file=sys.stderr)
            return None

    def release(self) -> None:
        """The run is closed: the marker goes (unlinked while still locked, so no scan can take it for a dead one)."""
        self.path.unlink(missing_ok=True)
        self._file.close()


def close_orphans(client, uri: str, keep: str | None) -> list[str]:
    """Mark KILLED every run of store `uri` still RUNNING whose process died
    without closing it; `keep`: the run this process is about to reopen. Returns
    what it did, a line per run."""
    folder, notes = _registry(), []
    for path in sorted(folder.glob(f"{_prefix(uri)}-*.json")) if folder.is_dir() else []:
        try:
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process lives
                if not path.exists() or os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                    continue  # released (or replaced) meanwhile
                facts = json.loads(f.read() or "{}")
                if facts.get("run_id") and facts["run_id"] != keep and _kill(client, facts):
                    notes.append(
                        f"note: MLflow run {facts['run_id']} ({facts.get('run_name', '')}) was left RUNNING by process "
                        f"{facts.get('pid')} on {facts.get('host')}, which ended without closing it; marked KILLED"
                    )
                path.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue  # another scan took it first, or a marker cut short
    return notes


def _kill(client, facts: dict) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        if client.get_run(facts["run_id"]).info.status != "RUNNING":
            return False
        who = f"process {facts.get('pid')} on {facts.get('host')}"
        why = f"marked KILLED by a later start: {who} ended without closing it"
        _retry_locked(client.set_tag, facts["run_id"], "lingmao.ended", why)
        _retry_locked(client.set_terminated, facts["run_id"], status="KILLED")
        return True
    except MlflowException:  # deleted, or in no store we can reach
        return False
