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
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

from .options import OptionError, doc, parse, usage

DEFAULT_EXPERIMENT = "lingmao"  # tracking.experiment_name's default in conf/config.yaml
UI_HOST = "http://127.0.0.1:5000"

PLOTS = ("val_loss_vs_step.png", "val_loss_vs_time.png", "throughput_by_hardware.png", "repetition_vs_step.png")

# Only these histories are fetched: one query per key per run, and only for
# keys the run actually logged.
HISTORY_KEYS = ("val/loss", "throughput/samples_per_sec", "throughput/tokens_per_sec", "mfu",
                "memory/peak_gb", "samples/rep4", "samples/greedy_rep4")

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids are uuid4 hex


class CompareError(Exception):
    """A problem the user can fix (wrong selector, no store): reported as
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
    ("lr", "lr", _num(".3g")),
    ("val_loss", "val loss", _num(".4f")),
    ("val_perplexity", "val ppl", _num(".2f")),
    ("samples_per_sec", "samples/s", _num(",.1f")),
    ("tokens_per_sec", "tokens/s", _num(",.0f")),
    ("mfu", "MFU", _mfu),
    ("rep4", "rep4", _num(".3f")),
    ("greedy_rep4", "rep4 greedy", _num(".3f")),
    ("peak_memory_gb", "peak mem (GB)", _num(".2f")),
    ("wall_s", "wall time", _duration),
    ("status", "status", lambda v: v or "–"),
)
CSV_FIELDS = [key for key, _, _ in COLUMNS] + ["run_id"]
_NUMERIC = {"params_m", "effective_batch", "lr", "val_loss", "val_perplexity", "samples_per_sec",
            "tokens_per_sec", "mfu", "rep4", "greedy_rep4", "peak_memory_gb", "wall_s"}


# --- store and selectors ---


def resolve_uri(uri: str | None) -> str:
    """tracking_uri=, else $MLFLOW_TRACKING_URI, else the tracker's default
    `sqlite:///<cwd>/mlflow.db`, made absolute as the tracker does, so the
    printed `mlflow ui` hint works from anywhere."""
    from .tracking import resolve_uri as tracker_uri

    return tracker_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd())


def open_store(uri: str):
    # Opening a missing sqlite file would silently create an empty store and
    # then report "no runs"; say where we looked instead.
    local = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else (uri if "://" not in uri else None)
    if local is not None and not Path(local).exists():
        raise CompareError(f"no MLflow store at {local} (tracking URI {uri}); run from the directory you "
                           f"trained in, or pass tracking_uri=sqlite:///PATH/mlflow.db or a mlruns folder")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


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
    return sel.parts[-len(rec.parts):] == rec.parts


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
                raise SelectorError(f"experiment {exp.name!r} (id {exp.experiment_id}) has no runs; "
                                    f"experiments in {uri}: {_available(client, experiments)}")
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
                    f"or run id in {uri}. Experiments: {_available(client, experiments)}{hint}")
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


def _collect(client, run) -> _Run:
    info, data = run.info, run.data
    tags, params = data.tags, data.params
    history: dict[str, list[tuple[int, int, float]]] = {}
    for key in HISTORY_KEYS:
        if key in data.metrics:
            pts = client.get_metric_history(info.run_id, key)
            history[key] = sorted((m.step, m.timestamp, m.value) for m in pts)
    n_params = _float(params.get("model.params"))
    batch = _float(params.get("plan.effective_batch"))
    peak = [v for _, _, v in history.get("memory/peak_gb", []) if math.isfinite(v)]
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    row = {
        "run": info.run_name or info.run_id[:8],
        "hardware": tags.get("hardware") or params.get("plan.preset"),
        "model": tags.get("model") or params.get("config.model.name"),
        "params_m": n_params / 1e6 if n_params is not None else None,
        "effective_batch": int(batch) if batch is not None else None,
        "lr": _float(params.get("plan.lr", params.get("config.optim.lr"))),  # plan.lr: after batch scaling
        "val_loss": _last(history.get("val/loss", [])),
        # The latest value MLflow keeps per key is the final one; no history needed.
        "val_perplexity": data.metrics.get("val/perplexity"),
        "samples_per_sec": _steady_median(history.get("throughput/samples_per_sec", [])),
        "tokens_per_sec": _steady_median(history.get("throughput/tokens_per_sec", [])),
        "mfu": _steady_median(history.get("mfu", [])),
        "rep4": _last(history.get("samples/rep4", [])),
        "greedy_rep4": _last(history.get("samples/greedy_rep4", [])),
        "peak_memory_gb": max(peak) if peak else None,
        "wall_s": wall,
        "status": info.status,
        "run_id": info.run_id,
    }
    return _Run(row=row, label=row["run"], experiment_id=info.experiment_id,
                start_ms=info.start_time or 0, history=history)


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


def _cells(run: _Run) -> list[str]:
    # The label, not the bare name, so re-runs sharing a name stay distinguishable.
    return [run.label if key == "run" else fmt(run.row[key]) for key, _, fmt in COLUMNS]


def _print_table(runs: list[_Run], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped to a file or CI log: don't squeeze into 80 columns
        console = Console(width=200)
    table = Table(title=title)
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="right" if key in _NUMERIC else "left", no_wrap=key == "run")
    for r in runs:
        table.add_row(*_cells(r))
    console.print(table)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            # Numbers stay numbers (full precision); missing is an empty cell.
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})


def _figure(title: str, xlabel: str, ylabel: str):
    # The object-oriented Figure renders with Agg on savefig and never
    # touches pyplot's global state or the user's backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    # A tight box keeps a legend placed outside the axes inside the image.
    fig.savefig(path, bbox_inches="tight", pad_inches=0.2)


def _empty(ax, message: str) -> None:
    """Every plot file is always written; with nothing to draw it says why."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=13, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _legend(ax, n: int) -> None:
    # Beyond a handful of runs an inside legend hides the curves: move it out.
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="run")
    else:
        ax.legend(fontsize="small", title="run")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    # tab10's hues are the most distinguishable; past ten the line style
    # changes instead of falling back to tab20's near-identical light pairs.
    return [colormaps["tab10"](i % 10) for i in range(n)]


def _style(i: int) -> str:
    return ("-", "--", ":", "-.")[i // 10 % 4]


def _line_plot(runs: list[_Run], key: str, path: Path, title: str, ylabel: str, empty: str,
               x_time: bool = False, baseline: tuple[str, str] | None = None) -> None:
    """One line per run of `key`; `baseline` (key, legend suffix) adds that
    metric of the same run as a dotted line in the run's colour."""
    fig, ax = _figure(title, "seconds since run start" if x_time else "step", ylabel)
    drawn = 0
    # A run keeps its colour and style in every plot, even where others are missing.
    for i, (r, color) in enumerate(zip(runs, _colors(len(runs)))):
        series = [(key, r.label, _style(i), "o")]
        if baseline:
            series.append((baseline[0], f"{r.label} {baseline[1]}", ":", "x"))
        for k, label, style, marker in series:
            pts = r.history.get(k)
            if not pts:
                continue
            xs = [(ms - r.start_ms) / 1000 if x_time else step for step, ms, _ in pts]
            ax.plot(xs, [v for _, _, v in pts], marker=marker, markersize=3, linewidth=1.6, color=color,
                    linestyle=style, label=label)
            drawn += 1
    if drawn:
        _legend(ax, drawn)
    else:
        _empty(ax, empty)
    _save(fig, path)


def _throughput_plot(runs: list[_Run], path: Path) -> None:
    fig, ax = _figure("Training throughput by hardware (median after the first log interval)", "run",
                      "samples / second")
    bars = sorted((r for r in runs if r.row["samples_per_sec"] is not None),
                  key=lambda r: (r.row["hardware"] or "", -r.row["samples_per_sec"]))
    if not bars:
        _empty(ax, "no throughput metrics logged (throughput/samples_per_sec)")
        _save(fig, path)
        return
    hardware = list(dict.fromkeys(r.row["hardware"] or "unknown" for r in bars))
    palette = dict(zip(hardware, _colors(len(hardware))))
    seen: set[str] = set()
    for i, r in enumerate(bars):
        hw = r.row["hardware"] or "unknown"
        ax.bar(i, r.row["samples_per_sec"], width=0.7, color=palette[hw], label=None if hw in seen else hw)
        seen.add(hw)
        ax.annotate(f"{r.row['samples_per_sec']:,.1f}", (i, r.row["samples_per_sec"]), ha="center",
                    va="bottom", fontsize="small", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(bars)), [r.label for r in bars], rotation=30 if len(bars) > 3 else 0,
                  ha="right" if len(bars) > 3 else "center")
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    pad = max(0.0, (4 - len(bars)) / 2)  # one or two bars would otherwise fill the whole width
    ax.set_xlim(-0.5 - pad, len(bars) - 0.5 + pad)
    ax.legend(title="hardware", fontsize="small")
    _save(fig, path)


def _write_plots(runs: list[_Run], out: Path) -> list[Path]:
    paths = [out / name for name in PLOTS]
    _line_plot(runs, "val/loss", paths[0], "Validation loss by step", "val loss (nats/token)",
               "no validation loss logged (val/loss)")
    _line_plot(runs, "val/loss", paths[1], "Validation loss by wall time", "val loss (nats/token)",
               "no validation loss logged (val/loss)", x_time=True)
    _throughput_plot(runs, paths[2])
    _line_plot(runs, "samples/rep4", paths[3], "Repetition in generated samples",
               "repeated 4-gram rate (samples/rep4)", "no repetition metrics logged (samples/rep4)",
               baseline=("samples/greedy_rep4", "(greedy, no penalty)"))
    return paths


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;margin:1em 0;display:block}code,pre{background:#f4f4f4;padding:2px 4px}"""


def _ui_urls(runs: list[_Run]) -> list[str]:
    """MLflow's chart view, one per experiment the runs come from."""
    ids = dict.fromkeys(r.experiment_id for r in runs)
    return [f"{UI_HOST}/#/experiments/{x}/runs?compareRunsMode=CHART" for x in ids]


def _write_html(runs: list[_Run], plots: list[Path], uri: str, title: str, path: Path) -> None:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join((f'<td class="n">{e(cell)}</td>' if key in _NUMERIC else f"<td>{e(cell)}</td>")
                         for (key, _, _), cell in zip(COLUMNS, _cells(r))) + "</tr>\n"
        for r in runs)
    images = "".join(f'<h2>{e(p.stem.replace("_", " "))}</h2>\n<img src="{e(p.name)}" alt="{e(p.stem)}">\n'
                     for p in plots)
    links = "".join(f'<li><a href="{e(url)}">{e(url)}</a></li>' for url in _ui_urls(runs))
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p>{len(runs)} runs from <code>{e(uri)}</code>, sorted by final validation loss.
Throughput and MFU are medians of the values logged after the first log interval.
Machine-readable: <a href="runs.csv">runs.csv</a>.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}</tbody></table>
{images}<h2>In the MLflow UI</h2>
<pre>mlflow ui --backend-store-uri {e(uri)}</pre>
<p>then open:</p><ul>{links}</ul>
</body></html>
""", encoding="utf-8")


def compare(selectors: list[str], tracking_uri: str | None, out: Path) -> Report:
    """Select runs, write runs.csv, the plots and index.html into `out`, print
    the table; raises CompareError (SelectorError) for what the user can fix."""
    uri = resolve_uri(tracking_uri)
    client = open_store(uri)
    selected, used = _select(client, list(selectors or []), uri)
    runs = [_collect(client, run) for run in selected]
    runs.sort(key=_sort_key)
    _unique_labels(runs)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"lingmao run comparison: {', '.join(used)}"
    rows = [r.row for r in runs]
    csv_path = out / "runs.csv"
    _write_csv(rows, csv_path)
    plots = _write_plots(runs, out)
    index = out / "index.html"
    _write_html(runs, plots, uri, title, index)
    # Printed last: the files exist even if the terminal output is cut short.
    _print_table(runs, title)
    for url in _ui_urls(runs):
        print(f"mlflow ui --backend-store-uri {uri}  then open {url}")
    return Report(rows=rows, out=out, files=[csv_path, *plots, index])


@dataclass
class Options:
    runs: List[str] = field(default_factory=list, metadata=doc(
        "experiment names or ids, sweep dirs (tag sweep.dir) or run ids; also as bare arguments; "
        f"empty: the experiment {DEFAULT_EXPERIMENT!r}, else the newest"))
    tracking_uri: str = field(default="", metadata=doc(
        "MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db"))
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
    except (OptionError, CompareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report.out.resolve() / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
