"""Compare tracked runs: a terminal table, runs.csv, plots and index.html.

    lingmao compare [SELECTOR ...] [tracking_uri=URI] [out=DIR]

A SELECTOR is an experiment name, an experiment id, a Hydra sweep dir (the
`sweep.dir` tag of multirun jobs) or a run id. With none, the runs of the
experiment "lingmao" are compared, or of the newest experiment if there is no
"lingmao".

Reads MLflow through `MlflowClient` only, so it works on any store the
tracker wrote (sqlite by default) without starting a server.
"""

from __future__ import annotations

import csv
import html
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingmao.config.options import OptionError, doc, parse, usage
from lingmao.report.page import write_page
from lingmao.report.plots import (
    PLOTS,  # noqa: F401 (the report's plot files; tests and callers import them here)
    find_cjk_font,
    steady,
    throughput_note,
    warn_no_font,
    write_plots,
)
from lingmao.tracking.store import StoreError, open_store, store_uri

DEFAULT_EXPERIMENT = "lingmao"  # tracking.experiment_name's default in conf/config.yaml
UI_HOST = "http://127.0.0.1:5000"

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

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids are uuid4 hex


class CompareError(Exception):
    """A problem the user can fix (a wrong selector): reported as
    `error: ...` with exit code 2, never as a traceback."""


class SelectorError(CompareError, LookupError):
    """A selector that matches no experiment, sweep or run."""


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one per run, sorted by final val loss; the CSV's values
    out: Path
    files: list[Path]


@dataclass
class _Run:
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


# --- columns: (key in rows and runs.csv, terminal/HTML header, cell format) ---


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "–" if v is None else format(v, fmt)


def _mfu(v: float | None) -> str:
    # MFU is conventionally a fraction of peak (0..1); a value above 1.5 can
    # only be a percentage already, so it is shown as is rather than x100.
    if v is None:
        return "–"
    return f"{v:.1%}" if v <= 1.5 else f"{v:.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("run", "run", lambda v: v or "–"),
    ("hardware", "hardware", lambda v: v or "–"),
    ("model", "model", lambda v: v or "–"),
    ("params_m", "params (M)", _num(".2f")),
    ("effective_batch", "eff. batch", _num("d")),
    ("varied", "sweep varied", lambda v: v or "–"),
    ("lr", "lr (set)", _num(".3g")),
    ("lr_scaled", "lr (batch-scaled)", _num(".3g")),
    ("train_loss", "train loss", _num(".4f")),
    ("val_loss", "val loss", _num(".4f")),
    ("val_perplexity", "val ppl", _num(".2f")),
    ("samples_per_sec", "samples/s", _num(",.1f")),
    ("tokens_per_sec", "tokens/s", _num(",.0f")),
    ("mfu", "MFU", _mfu),
    ("rep4", "rep4", _num(".3f")),
    ("greedy_rep4", "rep4 greedy", _num(".3f")),
    ("form", "5/7-char lines", _num(".0%")),
    ("form_ref", "corpus 5/7", _num(".0%")),
    ("peak_memory_gb", "peak mem (GB)", _num(".2f")),
    ("wall_s", "wall time", _duration),
    ("status", "status", lambda v: v or "–"),
)
_NUMERIC = {
    "params_m",
    "effective_batch",
    "lr",
    "lr_scaled",
    "train_loss",
    "val_loss",
    "val_perplexity",
    "samples_per_sec",
    "tokens_per_sec",
    "mfu",
    "rep4",
    "greedy_rep4",
    "form",
    "form_ref",
    "peak_memory_gb",
    "wall_s",
}
_GENRE = "val_loss_"  # per-genre columns: val_loss_<ascii genre>, after val_perplexity


def columns(genres: dict[str, str]) -> list[tuple[str, str, Callable[[Any], str]]]:
    """COLUMNS with one val-loss column per genre the runs logged."""
    cols = list(COLUMNS)
    at = [key for key, _, _ in cols].index("val_perplexity") + 1
    cols[at:at] = [(_GENRE + g, f"val loss {name}", _num(".4f")) for g, name in genres.items()]
    return cols


def _numeric(key: str) -> bool:
    return key in _NUMERIC or key.startswith(_GENRE)


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


def _select(client, selectors: list[str], uri: str) -> tuple[list, list[str]]:
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


# --- rows ---


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


def _collect(client, run) -> _Run:
    info, data = run.info, run.data
    tags, params = data.tags, data.params
    history = _histories(client, run)
    n_params = _float(params.get("model.params"))
    batch = _float(params.get("plan.effective_batch"))
    peak = [v for _, _, v in history.get("peak_memory_gb", []) if math.isfinite(v)]
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    genres = {k[len("genre.") :]: v for k, v in tags.items() if k.startswith("genre.")}
    genre_loss = {k[len("val/loss_") :]: v for k, v in data.metrics.items() if k.startswith("val/loss_")}
    row = {
        "run": info.run_name or info.run_id[:8],
        "hardware": tags.get("hardware") or params.get("plan.preset"),
        "model": tags.get("model") or params.get("config.model.name"),
        "params_m": n_params / 1e6 if n_params is not None else None,
        "effective_batch": int(batch) if batch is not None else None,
        "varied": tags.get("sweep.values") or None,
        "lr": _float(params.get("config.optim.lr")),  # what the user set
        "lr_scaled": _float(params.get("plan.lr")),  # after the batch-size rule
        "train_loss": _last(history.get("train/loss", [])),
        "val_loss": _last(history.get("val/loss", [])),
        # The latest value MLflow keeps per key is the final one; no history needed.
        "val_perplexity": data.metrics.get("val/perplexity"),
        **{_GENRE + g: v for g, v in genre_loss.items()},
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
    return _Run(
        row=row,
        label=row["run"],
        experiment_id=info.experiment_id,
        start_ms=info.start_time or 0,
        history=history,
        genre_loss=genre_loss,
        genres=genres,
        throughput=steady(history.get("samples_per_sec", [])),
        samples=_last_samples(client, info.run_id),
    )


def _sort_key(run: _Run) -> tuple:
    loss = run.row["val_loss"]
    # Runs without a finite val loss (crashed before the first eval, or
    # diverged to nan) go last; nan itself would make the order arbitrary.
    missing = loss is None or not math.isfinite(loss)
    return (missing, 0.0 if missing else loss, run.row["run"])


def _unique_labels(runs: list[_Run]) -> None:
    """Two runs with one name (a re-run) would share a legend entry: add the
    run id's start to tell them apart."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({r.row['run_id'][:6]})"


# --- outputs ---


Cols = list[tuple[str, str, Callable[[Any], str]]]


def _cells(run: _Run, cols: Cols) -> list[str]:
    # The label, not the bare name, so re-runs sharing a name stay distinguishable.
    return [run.label if key == "run" else fmt(run.row.get(key)) for key, _, fmt in cols]


def _print_table(runs: list[_Run], cols: Cols, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped to a file or CI log: don't squeeze into 80 columns
        console = Console(width=240)
    table = Table(title=title)
    for key, header, _ in cols:
        table.add_column(header, justify="right" if _numeric(key) else "left", no_wrap=key == "run")
    for r in runs:
        table.add_row(*_cells(r, cols))
    console.print(table)


def _write_csv(rows: list[dict[str, Any]], cols: Cols, path: Path) -> None:
    fields = [key for key, _, _ in cols] + ["run_id"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            # Numbers stay numbers (full precision); missing is an empty cell.
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})


def _table_html(runs: list[_Run], cols: Cols) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
    body = "".join(
        "<tr>"
        + "".join(
            (f'<td class="n">{e(cell)}</td>' if _numeric(key) else f"<td>{e(cell)}</td>")
            for (key, _, _), cell in zip(cols, _cells(r, cols))
        )
        + "</tr>\n"
        for r in runs
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def ui_urls(runs: list[_Run]) -> list[str]:
    """MLflow's chart view, one per experiment the runs come from."""
    ids = dict.fromkeys(r.experiment_id for r in runs)
    return [f"{UI_HOST}/#/experiments/{x}/runs?compareRunsMode=CHART" for x in ids]


def varied_keys(runs: list[_Run]) -> list[str]:
    """The config keys the runs' sweeps varied (tags sweep.values, which
    leave optim.lr to the run name), plus optim.lr where the runs set different ones."""
    keys = dict.fromkeys(kv.split("=", 1)[0] for r in runs for kv in (r.row["varied"] or "").split() if "=" in kv)
    if len({r.row["lr"] for r in runs if r.row["lr"] is not None}) > 1:
        keys["optim.lr"] = None
    return list(keys)


def _genres(runs: list[_Run]) -> dict[str, str]:
    """ASCII genre metric name -> the genre's own name, over all runs."""
    names: dict[str, str] = {}
    for r in runs:
        for g in r.genre_loss:
            names.setdefault(g, r.genres.get(g, g))
    return names


def compare(selectors: list[str], tracking_uri: str | None, out: Path) -> Report:
    """Select runs, write runs.csv, the plots and index.html into `out`, print
    the table; raises CompareError (SelectorError) for what the user can fix."""
    uri = store_uri(tracking_uri)
    client = open_store(uri)
    selected, used = _select(client, list(selectors or []), uri)
    runs = [_collect(client, run) for run in selected]
    runs.sort(key=_sort_key)
    _unique_labels(runs)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"lingmao run comparison: {', '.join(used)}"
    genres = _genres(runs)
    cols = columns(genres)
    rows = [r.row for r in runs]
    csv_path = out / "runs.csv"
    _write_csv(rows, cols, csv_path)
    font = find_cjk_font()
    warn_no_font(font)
    spread = throughput_note({r.label: r.throughput for r in runs})
    plots = write_plots(runs, genres, spread, out, font)
    varied = varied_keys(runs)
    notes = [
        f"The sweep varied: {', '.join(varied)}." if varied else "No swept keys recorded (tag sweep.values).",
        f"Throughput: {spread}.",
        f"Plot font for Chinese: {font.family or '-'} ({font.source}).",
    ]
    index = out / "index.html"
    write_page(
        index,
        title,
        uri,
        len(runs),
        notes,
        _table_html(runs, cols),
        plots,
        [(r.label, r.samples) for r in runs],
        ui_urls(runs),
    )
    # Printed last: the files exist even if the terminal output is cut short.
    _print_table(runs, cols, title)
    for note in notes[:2]:
        print(note)
    for url in ui_urls(runs):
        print(f"mlflow ui --backend-store-uri {uri}  then open {url}  (Group by -> hardware or model)")
    return Report(rows=rows, out=out, files=[csv_path, *plots, index])


@dataclass
class Options:
    runs: list[str] = field(
        default_factory=list,
        metadata=doc(
            "experiment names or ids, sweep dirs (tag sweep.dir) or run ids; also as bare arguments; "
            f"empty: the experiment {DEFAULT_EXPERIMENT!r}, else the newest"
        ),
    )
    tracking_uri: str = field(
        default="", metadata=doc("MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    )
    out: str = field(default="", metadata=doc("report folder; empty: reports/compare-<timestamp>"))


SUMMARY = "Compare lingmao runs recorded in MLflow: a table, runs.csv, plots and index.html."
EXAMPLES = [
    "lingmao compare                                  # the experiment 'lingmao'",
    "lingmao compare multirun/2026-01-01/12-00-00 out=reports/lr-sweep",
    "lingmao compare runs=[lingmao,ablation] tracking_uri=sqlite:///elsewhere/mlflow.db",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage(Options, "compare", SUMMARY, EXAMPLES))
        return 0
    try:
        o = parse(Options, argv, positional="runs")
        out = Path(o.out) if o.out else Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        report = compare(o.runs, o.tracking_uri or None, out)
    except (OptionError, CompareError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report.out.resolve() / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
