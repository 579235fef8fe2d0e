"""A compare report end to end: the selected runs' runs.csv, plots and
index.html in one folder, and the table printed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingmao.report import table
from lingmao.report.collect import Run, collect, select
from lingmao.report.page import Page, write_page
from lingmao.report.plots import find_cjk_font, throughput_note, warn_no_font, write_plots
from lingmao.tracking.record import MIN_GENRE_TOKENS
from lingmao.tracking.store import open_store, store_uri, where


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one per run, sorted by final val loss; the CSV's values
    out: Path
    files: list[Path]


def ui_links(runs: list[Run], uri: str) -> list[tuple[str, str]]:
    """(how to look, the link) per experiment the runs come from: MLflow's
    runs table of just these runs, with what they vary as columns, sorted by
    val/loss (a shared view, tracking/view.py)."""
    by_experiment: dict[str, list[Run]] = {}
    for r in runs:
        by_experiment.setdefault(r.experiment_id, []).append(r)
    links = []
    for exp, chosen in by_experiment.items():
        ids = ", ".join(f"'{r.row['run_id']}'" for r in chosen)
        # Past a few hundred ids the filter outgrows an experiment tag: the whole experiment then.
        line = where(uri, exp, f"attributes.run_id IN ({ids})" if len(chosen) <= MAX_FILTERED else "")
        links.append((line, re.search(r"https?://\S+", line).group(0)))
    return links


MAX_FILTERED = 200


def notes(runs: list[Run], varied: list[str], spread: str, font) -> list[str]:
    """The report's notes, the first ones also printed under the table."""
    out = [
        f"The runs vary: {', '.join(varied)} (column varied)."
        if varied
        else "No varied keys recorded (tag sweep.values).",
        f"Throughput: {spread}.",
    ]
    few = sorted({f"{r.genres.get(g, g)} ({g})" for r in runs for g in r.genre_loss if table.few_tokens(r, g)})
    if few:
        out.append(
            f"{table.FEW} per-genre val loss from fewer than {MIN_GENRE_TOKENS} tokens ({', '.join(few)}): its "
            f"standard error is 0.1 nats or more, as large as the differences between runs (tokens in runs.csv)."
        )
    unknown = sum(1 for r in runs if r.genre_loss and not r.genre_tokens)
    if unknown:
        out.append(f"{unknown} run(s) did not record the tokens behind their per-genre loss (tags genre_tokens.*).")
    out.append(f"Plot font for Chinese: {font.family or '-'} ({font.source}).")
    return out


def compare(selectors: list[str], tracking_uri: str | None, out: Path) -> Report:
    """Select runs, write runs.csv, the plots and index.html into `out`, print
    the table; raises CompareError (SelectorError) for what the user can fix."""
    uri = store_uri(tracking_uri)
    client = open_store(uri)
    selected, used = select(client, list(selectors or []), uri)
    runs = [collect(client, run) for run in selected]
    runs.sort(key=table.sort_key)
    table.unique_labels(runs)
    table.mark_best(runs)
    varied = table.varied_keys(runs)
    table.fill_varied(runs, varied)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"lingmao run comparison: {', '.join(used)}"
    genres = table.genres(runs)
    cols = table.columns(genres)
    rows = [r.row for r in runs]
    csv_path = out / "runs.csv"
    table.write_csv(rows, cols + table.token_columns(genres), csv_path)
    font = find_cjk_font()
    warn_no_font(font)
    spread = throughput_note({r.label: r.throughput for r in runs})
    plots = write_plots(runs, genres, spread, out, font)
    said = notes(runs, varied, spread, font)
    links = ui_links(runs, uri)
    index = out / "index.html"
    page = Page(title, uri, len(runs), said, table.table_html(runs, cols), plots, links)
    write_page(index, page, [(r.label, r.samples) for r in runs])
    # Printed last: the files exist even if the terminal output is cut short.
    table.print_table(runs, cols, title)
    for note in said[:-1]:
        print(note)
    for line, _ in links:
        print(line)
    return Report(rows=rows, out=out, files=[csv_path, *plots, index])
