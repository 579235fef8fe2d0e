"""The compare report's table: its columns and cells, the run order and
labels, and the table as printed, as runs.csv and as HTML."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lingmao.report.collect import GENRE, GENRE_TOKENS, Run
from lingmao.tracking.record import MIN_GENRE_TOKENS

BEST = "*"  # marks the run with the lowest final val loss
FEW = "†"  # marks a per-genre loss from fewer than MIN_GENRE_TOKENS tokens
# What the terminal shows, in at most CONSOLE_WIDTH columns; every column is in runs.csv and index.html.
CONSOLE = ("best", "run", "varied", "hardware", "model", "val_loss", "samples_per_sec", "wall_s")
CONSOLE_WIDTH = 100
NAME_WIDTH = 28  # the run column's widest: longer names end in "…" (in full in runs.csv and the page)

# --- columns: (key in rows and runs.csv, terminal/HTML header, cell format) ---

Cols = list[tuple[str, str, Callable[[Any], str]]]


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
    ("best", "best", lambda v: BEST if v else ""),
    ("run", "run", lambda v: v or "–"),
    ("hardware", "hardware", lambda v: v or "–"),
    ("model", "model", lambda v: v or "–"),
    ("params_m", "params (M)", _num(".2f")),
    ("effective_batch", "eff. batch", _num("d")),
    ("varied", "varied", lambda v: v or "–"),
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


def columns(genres: dict[str, str]) -> Cols:
    """COLUMNS with one val-loss column per genre the runs logged, after
    val_perplexity, and the tokens each of them averages (runs.csv only)."""
    cols = list(COLUMNS)
    at = [key for key, _, _ in cols].index("val_perplexity") + 1
    cols[at:at] = [(GENRE + g, f"val loss {name}", _num(".4f")) for g, name in genres.items()]
    return cols


def token_columns(genres: dict[str, str]) -> Cols:
    return [(GENRE_TOKENS + g, f"tokens {name}", _num("d")) for g, name in genres.items()]


def _numeric(key: str) -> bool:
    return key in _NUMERIC or key.startswith((GENRE, GENRE_TOKENS))


def few_tokens(run: Run, genre: str) -> bool:
    """Is the run's loss of `genre` averaged over too few tokens to tell runs apart?"""
    n = run.genre_tokens.get(genre)
    return n is not None and n < MIN_GENRE_TOKENS


def genres(runs: list[Run]) -> dict[str, str]:
    """ASCII genre metric name -> the genre's own name, over all runs."""
    names: dict[str, str] = {}
    for r in runs:
        for g in r.genre_loss:
            names.setdefault(g, r.genres.get(g, g))
    return names


def varied_keys(runs: list[Run]) -> list[str]:
    """The config keys the runs' sweeps varied (tags sweep.values), plus
    optim.lr where the runs set different ones (sweeps recorded before the
    tag held the LR left it to the run name)."""
    keys = dict.fromkeys(k for r in runs for k in r.swept)
    if len({r.row["lr"] for r in runs if r.row["lr"] is not None}) > 1:
        keys["optim.lr"] = None
    return list(keys)


def fill_varied(runs: list[Run], keys: list[str]) -> None:
    """Each run's values of the varied `keys`, as its sweep recorded them or
    as its config holds them: `optim.lr=0.001 optim.warmup=0`."""
    for r in runs:
        values = {k: r.swept.get(k) or r.config.get(k) or r.config.get(f"{k}.name") for k in keys}
        r.row["varied"] = " ".join(f"{k}={v}" for k, v in values.items() if v is not None) or None


def mark_best(runs: list[Run]) -> None:
    """The first of the sorted runs, if it has a final val loss."""
    if runs and sort_key(runs[0])[0] is False:
        runs[0].row["best"] = True


# --- rows: their order and labels ---


def sort_key(run: Run) -> tuple:
    loss = run.row["val_loss"]
    # Runs without a finite val loss (crashed before the first eval, or
    # diverged to nan) go last; nan itself would make the order arbitrary.
    missing = loss is None or not math.isfinite(loss)
    return (missing, 0.0 if missing else loss, run.row["run"])


def unique_labels(runs: list[Run]) -> None:
    """Two runs with one name (a re-run) would share a legend entry: add the
    run id's start to tell them apart."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({r.row['run_id'][:6]})"


# --- outputs ---


def _cells(run: Run, cols: Cols) -> list[str]:
    # The label, not the bare name, so re-runs sharing a name stay distinguishable.
    cells = []
    for key, _, fmt in cols:
        cell = run.label if key == "run" else fmt(run.row.get(key))
        if key.startswith(GENRE) and few_tokens(run, key[len(GENRE) :]):
            cell += FEW
        cells.append(cell)
    return cells


def print_table(runs: list[Run], cols: Cols, title: str) -> None:
    """The CONSOLE columns in at most CONSOLE_WIDTH terminal columns, a run
    to a line; the rest are in runs.csv and index.html."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    width = min(console.width, CONSOLE_WIDTH) if console.is_terminal else CONSOLE_WIDTH
    console = Console(width=width)
    shown = [c for c in cols if c[0] in CONSOLE]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for key, header, _ in shown:
        if key == "run":
            table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=NAME_WIDTH)
        elif key == "varied":
            table.add_column(header, overflow="fold", min_width=16, max_width=30)
        else:
            table.add_column(
                "" if key == "best" else header, justify="right" if _numeric(key) else "left", no_wrap=True
            )
    for r in runs:
        table.add_row(*_cells(r, shown))
    console.print(table)
    rest = len(cols) - len(shown)
    console.print(
        f"{BEST} lowest final val loss. {rest} more columns (per genre, MFU, memory...) in runs.csv and index.html."
    )


def write_csv(rows: list[dict[str, Any]], cols: Cols, path: Path) -> None:
    fields = [key for key, _, _ in cols] + ["run_id"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            # Numbers stay numbers (full precision); missing is an empty cell.
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})


def table_html(runs: list[Run], cols: Cols) -> str:
    """The table, the best run's row highlighted and a low-token genre cell
    titled with its count; wide tables scroll rather than squeeze the names."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
    rows = []
    for r in runs:
        tds = []
        for (key, _, _), cell in zip(cols, _cells(r, cols)):
            genre = key[len(GENRE) :] if key.startswith(GENRE) else None
            title = f' title="{r.genre_tokens[genre]} tokens"' if genre in r.genre_tokens else ""
            kind = "n" if _numeric(key) else ("name" if key in ("best", "run", "varied") else "")
            cell = "★ best" if key == "best" and cell else cell
            tds.append(f'<td class="{kind}"{title}>{e(cell)}</td>')
        rows.append(f"<tr{' class=best' if r.row['best'] else ''}>" + "".join(tds) + "</tr>\n")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>\n{"".join(rows)}</tbody></table></div>'
