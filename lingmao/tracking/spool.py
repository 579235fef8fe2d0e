"""Where tracking records land: an MLflow store, or the JSONL spool that
stands in for it, and the replay of a spool into a store later.

A record is a small dict (`{"op": "metrics", "metrics": [[key, value, ms,
step], ...]}` and so on); the live tracker and the replay both apply records
with `apply`, so a spooled run reads the same in the store as a live one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from lingmao.tracking.store import (
    TrackingError,
    _retry_locked,
    ensure_store,
    experiment_id,
    quiet_mlflow,
    resolve_uri,
    store_problem,
    unreachable,
    where,
)

SPOOL_NAME = "mlflow_spool.jsonl"
_BATCH = 900  # metrics per log_batch: MLflow accepts up to 1000
_PARAMS = 100  # params per log_batch: MLflow's limit


def _params(client, run_id: str, params: dict[str, str], step) -> None:
    """MLflow params are immutable. A key the run already has with another
    value (a resumed run whose settings changed) keeps its first value, and
    the new one goes in `resumed.<step>.<key>` (`.2`, `.3`... if that too is
    taken), so the run shows both what it started with and what changed
    when."""
    from mlflow.entities import Param

    have = _retry_locked(client.get_run, run_id).data.params
    out = {}
    for key, value in params.items():
        if key in have and have[key] != value:
            base = f"resumed.{step}.{key}" if step is not None else f"resumed.{key}"
            key, n = base, 2
            while have.get(key, value) != value:
                key, n = f"{base}.{n}", n + 1
        if have.get(key) != value:
            out[key] = value
    items = [Param(k, v) for k, v in out.items()]
    for i in range(0, len(items), _PARAMS):
        _retry_locked(client.log_batch, run_id, params=items[i : i + _PARAMS])


def _dataset(client, run_id: str, rec: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    d = rec["dataset"]
    entity = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=json.dumps({"uri": d["source"]}),
        profile=json.dumps(d["profile"]),
    )
    _retry_locked(
        client.log_inputs, run_id, [DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])]
    )


def apply(client, run_id: str, rec: dict) -> None:
    """Apply one record to a run: the live sender and the spool import share it."""
    from mlflow.entities import Metric, RunTag

    op = rec["op"]
    if op == "metrics":
        metrics = [Metric(k, v, t, s) for k, v, t, s in rec["metrics"]]
        for i in range(0, len(metrics), _BATCH):
            _retry_locked(client.log_batch, run_id, metrics=metrics[i : i + _BATCH])
    elif op == "params":
        _params(client, run_id, rec["params"], rec.get("step"))
    elif op == "tags":
        _retry_locked(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
    elif op == "dataset":
        _dataset(client, run_id, rec)
    elif op == "text":
        _retry_locked(client.log_text, run_id, rec["text"], rec["name"])
    elif op == "artifact":
        _retry_locked(client.log_artifact, run_id, rec["path"], rec.get("folder"))
    elif op == "end":
        _retry_locked(client.set_terminated, run_id, rec["status"], rec["time"])
    else:
        raise TrackingError(f"unknown spool record {op!r}")


def import_hint(spool: Path, uri: str) -> str:
    return f"python -m lingmao.tracking import {spool} --tracking-uri {uri}"


class Spool:
    """The JSONL file a run's records go to while its store cannot take them.
    Its first record (`start`) says which store and run they were meant for."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.count = 0  # records written, the start records not counted

    def start(self, header: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"op": "start", **header})

    def write(self, rec: dict) -> None:
        if rec["op"] == "artifact":  # copy: the file may be gone or changed by import time
            src = Path(rec["path"])
            dst = self.path.parent / "mlflow_spool_artifacts" / str(self.count) / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            rec = {**rec, "path": str(dst.relative_to(self.path.parent))}
        self._append(rec)
        self.count += 1

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_spool(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TrackingError(
            f"no spool at {path} (runs that could not reach their store leave {SPOOL_NAME} in their run folder)"
        )
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
    return records[marks[-1] + 1 :] if marks else records


def import_spool(path: Path, uri: str | None = None) -> tuple[str, str]:
    """Replay a spool into a store; returns (uri, last run id). A segment
    whose run exists in that store continues it, otherwise a new run is made.
    What was imported is marked so, and never imported twice. A metric point
    that reached the store before the spool took over (a send the store
    answered too late) is stored once: MLflow skips exact duplicates."""
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
        raise TrackingError(f"{store_problem(uri, why)}; start it or pass --tracking-uri (e.g. sqlite:///mlflow.db)")
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
                run_id = client.create_run(
                    exp_id, run_name=rec["run_name"], start_time=rec["start_ms"], tags=rec.get("tags")
                ).info.run_id
            client.set_tag(run_id, "lingmao.spool", str(path))
            continue
        if rec["op"] == "artifact":
            rec = {**rec, "path": str(path.parent / rec["path"])}
        apply(client, run_id, rec)
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
        lines.append(
            f"{len(spools)} job(s) could not reach {uri}; import their spools when it is back:\n  "
            f"python -m lingmao.tracking import {' '.join(str(p) for p in spools)} --tracking-uri {uri}"
        )
    why = unreachable(uri)
    if why is not None:
        return "\n".join(lines or [store_problem(uri, why)])
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
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
    lines.insert(
        0,
        f"mlflow: sweep {sweep}: {len(runs)} run(s) in {uri} ({counts or 'none'}); group them in "
        f"the UI by tag sweep.id, or filter {search}\n  {where(uri, exp.experiment_id, search)}",
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lingmao.tracking",
        description="lingmao's MLflow tracking: replay spools of runs that could not reach their store.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help=f"replay spool(s) ({SPOOL_NAME}) into an MLflow store")
    imp.add_argument("spools", nargs="+", type=Path, metavar="SPOOL")
    imp.add_argument(
        "--tracking-uri",
        default=None,
        help="the store to import into (default: the one each run could not reach, as written in its spool)",
    )
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
