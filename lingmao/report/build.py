"""A compare report end to end: the selected runs' runs.csv, plots and
index.html in one folder, and the table printed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingmao.report import table
from lingmao.report.collect import Run, collect, select
from lingmao.report.page import write_page
from lingmao.report.plots import find_cjk_font, throughput_note, warn_no_font, write_plots
from lingmao.tracking.store import open_store, store_uri

UI_HOST = "http://127.0.0.1:5000"


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one per run, sorted by final val loss; the CSV's values
    out: Path
    files: list[Path]


def ui_urls(runs: list[Run]) -> list[str]:
    """MLflow's chart view, one per experiment the runs come from."""
    ids = dict.fromkeys(r.experiment_id for r in runs)
    return [f"{UI_HOST}/#/experiments/{x}/runs?compareRunsMode=CHART" for x in ids]


def compare(selectors: list[str], tracking_uri: str | None, out: Path) -> Report:
    """Select runs, write runs.csv, the plots and index.html into `out`, print
    the table; raises CompareError (SelectorError) for what the user can fix."""
    uri = store_uri(tracking_uri)
    client = open_store(uri)
    selected, used = select(client, list(selectors or []), uri)
    runs = [collect(client, run) for run in selected]
    runs.sort(key=table.sort_key)
    table.unique_labels(runs)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"lingmao run comparison: {', '.join(used)}"
    genres = table.genres(runs)
    cols = table.columns(genres)
    rows = [r.row for r in runs]
    csv_path = out / "runs.csv"
    table.write_csv(rows, cols, csv_path)
    font = find_cjk_font()
    warn_no_font(font)
    spread = throughput_note({r.label: r.throughput for r in runs})
    plots = write_plots(runs, genres, spread, out, font)
    varied = table.varied_keys(runs)
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
        table.table_html(runs, cols),
        plots,
        [(r.label, r.samples) for r in runs],
        ui_urls(runs),
    )
    # Printed last: the files exist even if the terminal output is cut short.
    table.print_table(runs, cols, title)
    for note in notes[:2]:
        print(note)
    for url in ui_urls(runs):
        print(f"mlflow ui --backend-store-uri {uri}  then open {url}  (Group by -> hardware or model)")
    return Report(rows=rows, out=out, files=[csv_path, *plots, index])
