"""The runs a compare report covers: selecting them in the MLflow store and
collecting what the report needs of each (its row, histories, samples).

Reads MLflow through `MlflowClient` only, so it works on any store the
tracker wrote (sqlite by default) without starting a server.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingmao.report.plots import steady

DEFAULT_EXPERIMENT = "lingmao"  # tracking.experiment_name's default in conf/config.yaml

# Only these histories are fetched: one query per key per run, and only for
# keys the run actually logged. Each key with the names runs logged it under
# before the metrics were renamed (so older stores still compare).
HISTORY_KEYS = {
    "train/loss": (),
    "val/loss": (),
    "samples_per_sec": ("throughput/samples_per_sec",),
    "tokens_per_sec": ("throughput/tokens_per_sec",),
    "mfu": (),
    "peak_memory_gb": ("memory/peak_gb",),
    "val/samples/rep4": ("samples/rep4",),
    "val/samples/greedy_rep4": ("samples/greedy_rep4",),
}
FORM_KEYS = ("val/samples/form", "samples/form")
GENRE = "val_loss_"  # per-genre row keys: val_loss_<ascii genre>
GENRE_TOKENS = "val_tokens_"  # and the tokens each averages: val_tokens_<ascii genre> (tags genre_tokens.<genre>)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids are uuid4 hex


class CompareError(Exception):
    """A problem the user can fix (a wrong selector): reported as
    `error: ...` with exit code 2, never as a traceback."""


class SelectorError(CompareError, LookupError):
    """A selector that matches no experiment, sweep or run."""


@dataclass
class Run:
    """What the report needs from one MLflow run."""

    row: dict[str, Any]
    label: str  # legend name: the run name, made unique if two runs share one
    experiment_id: str
    start_ms: int
    history: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # key -> (step, ms, value)
    genre_loss: dict[str, float] = field(default_factory=dict)  # ASCII genre name -> final val loss
    genres: dict[str, str] = field(default_factory=dict)  # ASCII genre name -> the genre (tags genre.<ascii>)
    throughput: list[float] = field(default_factory=list)  # samples/s per log interval, the first left out
    samples: list[dict] = field(default_factory=list)  # the last eval's samples (samples.jsonl)
    genre_tokens: dict[str, int] = field(default_factory=dict)  # ASCII genre name -> tokens its loss averages
    swept: dict[str, str] = field(default_factory=dict)  # what the run's sweep varied (tag sweep.values): key -> value
    config: dict[str, str] = field(default_factory=dict)  # params config.<key>, without the prefix


# --- store and selectors ---


def _paged(fetch: Callable[[str | None], Any]) -> list:
    """All pages of an MLflow search (each returns a PagedList with a token)."""
    items, token = [], None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _experiments(client) -> list:
    return _paged(lambda t: client.search_experiments(order_by=["creation_time DESC"], page_token=t))


def _runs_of(client, experiment_ids: list[str], filter_string: str = "") -> list:
    if not experiment_ids:
        return []
    return _paged(lambda t: client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=t))


def _available(client, experiments: list) -> str:
    counts = {e.experiment_id: len(_runs_of(client, [e.experiment_id])) for e in experiments}
    names = ", ".join(f"{e.name!r} (id {e.experiment_id}, {counts[e.experiment_id]} runs)" for e in experiments)
    return names or "none"


def _same_dir(selector: str, tag: str) -> bool:
    """Is `selector` the sweep dir recorded in `tag`? Hydra records sweep.dir
    as written in the config (relative to the launch dir by default, e.g.
    multirun/2024-05-01/12-00-00), while users paste it relative, absolute or
    with a trailing slash."""
    if selector.rstrip("/") == tag.rstrip("/"):
        return True
    sel, rec = Path(selector).resolve(), Path(tag.rstrip("/"))
    if rec.is_absolute():
        return sel == rec.resolve()
    # A relative tag: any path that ends with it (the selector, made absolute
    # against the cwd, names the same folder from wherever it was launched).
    return sel.parts[-len(rec.parts) :] == rec.parts


def select(client, selectors: list[str], uri: str) -> tuple[list, list[str]]:
    """The runs the selectors name, each once, in selector order, and the
    selectors used (the default experiment's name when none were given)."""
    experiments = _experiments(client)
    by_name = {e.name: e for e in experiments}
    by_id = {e.experiment_id: e for e in experiments}
    if not selectors:
        if not experiments:
            raise SelectorError(f"the store {uri} has no experiments; train a run first")
        default = by_name.get(DEFAULT_EXPERIMENT) or experiments[0]  # newest first
        selectors = [default.name]

    swept: list | None = None  # runs carrying a sweep.dir tag, fetched on first need
    runs: dict[str, Any] = {}
    for sel in selectors:
        exp = by_name.get(sel) or (by_id.get(sel) if sel.isdigit() and sel == str(int(sel)) else None)
        if exp is not None:
            found = _runs_of(client, [exp.experiment_id])
            if not found:
                raise SelectorError(
                    f"experiment {exp.name!r} (id {exp.experiment_id}) has no runs; "
                    f"experiments in {uri}: {_available(client, experiments)}"
                )
        elif _RUN_ID.match(sel) and (run := _get_run(client, sel)) is not None:
            found = [run]
        else:
            if swept is None:
                swept = _runs_of(client, list(by_id), "tags.\"sweep.dir\" LIKE '%'")
            found = [r for r in swept if _same_dir(sel, r.data.tags["sweep.dir"])]
            if not found:
                sweeps = sorted({r.data.tags["sweep.dir"] for r in swept})
                hint = f"; sweep dirs: {', '.join(sweeps[-5:])}" if sweeps else ""
                raise SelectorError(
                    f"selector {sel!r} matches no experiment name, experiment id, sweep dir (tag sweep.dir) "
                    f"or run id in {uri}. Experiments: {_available(client, experiments)}{hint}"
                )
        for run in found:
            runs.setdefault(run.info.run_id, run)
    return list(runs.values()), selectors


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


# --- what the report needs of each run ---


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _steady_median(points: list[tuple[int, int, float]]) -> float | None:
    """Median of the logged values after the first: the first log interval
    holds start-up and compilation. A run that logged only once keeps that one
    value rather than showing nothing."""
    values = [v for _, _, v in points if math.isfinite(v)]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def _last(points: list[tuple[int, int, float]]) -> float | None:
    return points[-1][2] if points else None


def _histories(client, run) -> dict[str, list[tuple[int, int, float]]]:
    history = {}
    for key, old in HISTORY_KEYS.items():
        logged = next((k for k in (key, *old) if k in run.data.metrics), None)
        if logged:
            pts = client.get_metric_history(run.info.run_id, logged)
            history[key] = sorted((m.step, m.timestamp, m.value) for m in pts)
    return history


def _last_samples(client, run_id: str) -> list[dict]:
    """The samples of the run's last eval, from its samples.jsonl artifact
    (none if it has none or the artifact store cannot be read)."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    try:
        if not any(f.path == "samples.jsonl" for f in client.list_artifacts(run_id)):
            return []
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(client.download_artifacts(run_id, "samples.jsonl", tmp))
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (MlflowException, OSError, ValueError):
        return []
    last = max((r.get("step", 0) for r in rows), default=None)
    return [r for r in rows if r.get("step", 0) == last]


def collect(client, run) -> Run:
    info, data = run.info, run.data
    tags, params = data.tags, data.params
    history = _histories(client, run)
    n_params = _float(params.get("model.params"))
    batch = _float(params.get("plan.effective_batch"))
    peak = [v for _, _, v in history.get("peak_memory_gb", []) if math.isfinite(v)]
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    genres = {k[len("genre.") :]: v for k, v in tags.items() if k.startswith("genre.")}
    genre_loss = {k[len("val/loss_") :]: v for k, v in data.metrics.items() if k.startswith("val/loss_")}
    tokens = {k[len("genre_tokens.") :]: int(_float(v) or 0) for k, v in tags.items() if k.startswith("genre_tokens.")}
    swept = dict(kv.split("=", 1) for kv in (tags.get("sweep.values") or "").split() if "=" in kv)
    row = {
        "run": info.run_name or info.run_id[:8],
        "hardware": tags.get("hardware") or params.get("plan.preset"),
        "model": tags.get("model") or params.get("config.model.name"),
        "params_m": n_params / 1e6 if n_params is not None else None,
        "effective_batch": int(batch) if batch is not None else None,
        "best": False,  # set once all runs are sorted (table.mark_best)
        "varied": None,  # the values of what the runs vary, set once all are collected (table.fill_varied)
        "lr": _float(params.get("config.optim.lr")),  # what the user set
        "lr_scaled": _float(params.get("plan.lr")),  # after the batch-size rule
        "train_loss": _last(history.get("train/loss", [])),
        "val_loss": _last(history.get("val/loss", [])),
        # The latest value MLflow keeps per key is the final one; no history needed.
        "val_perplexity": data.metrics.get("val/perplexity"),
        **{GENRE + g: v for g, v in genre_loss.items()},
        **{GENRE_TOKENS + g: n for g, n in tokens.items()},
        "samples_per_sec": _steady_median(history.get("samples_per_sec", [])),
        "tokens_per_sec": _steady_median(history.get("tokens_per_sec", [])),
        "mfu": _steady_median(history.get("mfu", [])),
        "rep4": _last(history.get("val/samples/rep4", [])),
        "greedy_rep4": _last(history.get("val/samples/greedy_rep4", [])),
        "form": next((data.metrics[k] for k in FORM_KEYS if k in data.metrics), None),
        "form_ref": _float(params.get("data.verse_form")),  # the corpus's own share
        "peak_memory_gb": max(peak) if peak else None,
        "wall_s": wall,
        "status": info.status,
        "run_id": info.run_id,
    }
    return Run(
        row=row,
        label=row["run"],
        experiment_id=info.experiment_id,
        start_ms=info.start_time or 0,
        history=history,
        genre_loss=genre_loss,
        genres=genres,
        throughput=steady(history.get("samples_per_sec", [])),
        samples=_last_samples(client, info.run_id),
        genre_tokens=tokens,
        swept=swept,
        config={k[len("config.") :]: v for k, v in params.items() if k.startswith("config.")},
    )
