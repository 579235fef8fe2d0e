"""The compare report's PNG plots, drawn with a CJK-capable font so Chinese
run names and genre labels are not boxes, and the test that says whether
runs' throughput differs beyond its own interval-to-interval spread."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from lingmao.tracking.record import MIN_GENRE_TOKENS

PLOTS = (
    "train_loss_vs_step.png",
    "val_loss_vs_step.png",
    "val_loss_vs_time.png",
    "val_loss_by_genre.png",
    "throughput_by_hardware.png",
    "repetition_vs_step.png",
)

# Families known to cover Chinese, tried before scanning every font's glyphs.
_CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK",
    "Source Han Sans SC",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans GB",
    "Heiti SC",
    "Arial Unicode MS",
)
_PROBE = "诗词文赋曲"
_SPREAD_P = 0.05  # below it, throughput differences are more than the runs' own noise


def _covers(path: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError):
        return False
    return all(font.get_char_index(ord(c)) for c in _PROBE)


def _fontconfig_cjk() -> str | None:
    """A Chinese font file fontconfig knows: matplotlib caches its font list
    once, so a font installed after that (fonts-noto-cjk) is not in it."""
    if not shutil.which("fc-list"):
        return None
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted({line.split(":")[0].strip() for line in out.splitlines() if line.strip()})
    # Regular weights read best in a legend; .ttc collections hold the SC face.
    files.sort(key=lambda f: ("Regular" not in f, "Sans" not in f, f))
    return next((f for f in files if _covers(f)), None)


@dataclass
class Font:
    family: str | None  # the CJK family matplotlib falls back to; None: none found
    source: str  # where it came from, for the report


def find_cjk_font() -> Font:
    """The first CJK-capable font: a known family in matplotlib's list, any
    font there whose glyphs cover Chinese, else one fontconfig knows."""
    from matplotlib import font_manager

    fonts = font_manager.fontManager.ttflist
    by_name = {f.name: f for f in fonts}
    for family in _CJK_FAMILIES:
        if family in by_name and _covers(by_name[family].fname):
            return Font(family, by_name[family].fname)
    for f in fonts:
        # matplotlib's own "Last Resort" font maps every character to a placeholder box.
        if "Last Resort" not in f.name and _covers(f.fname):
            return Font(f.name, f.fname)
    path = _fontconfig_cjk()
    if path:
        font_manager.fontManager.addfont(path)
        return Font(font_manager.FontProperties(fname=path).get_name(), path)
    return Font(None, "none found: Chinese text draws as boxes (Debian: apt-get install fonts-noto-cjk)")


@contextlib.contextmanager
def cjk_fonts(font: Font):
    """matplotlib's own font first (Latin digits and signs), the CJK font as
    the per-glyph fallback; only for the plots drawn inside."""
    import matplotlib

    families = ["DejaVu Sans"] + ([font.family] if font.family else [])
    with matplotlib.rc_context({"font.family": families}):
        yield


# --- throughput spread ---


def steady(points: list[tuple[int, int, float]]) -> list[float]:
    """Logged values after the first interval (start-up and compilation)."""
    values = [v for _, _, v in points if math.isfinite(v)]
    return values[1:] if len(values) > 1 else values


def throughput_note(series: dict[str, list[float]]) -> str:
    """Whether the runs' throughputs differ beyond each run's own spread over
    its log intervals (Kruskal-Wallis across runs; needs 3+ values a run)."""
    from scipy import stats

    usable = {k: v for k, v in series.items() if len(v) >= 3 and len(set(v)) > 1}
    if len(usable) < 2:
        return "too few log intervals per run to tell throughput differences from noise"
    p = stats.kruskal(*usable.values()).pvalue
    if p >= _SPREAD_P:
        return (
            f"throughput differences between these runs are within the runs' own interval-to-interval "
            f"spread (Kruskal-Wallis p={p:.2g}): read them as noise"
        )
    return f"throughput differs between runs beyond their own spread (Kruskal-Wallis p={p:.2g})"


# --- plots ---


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


def _legend(ax, n: int, title: str = "run") -> None:
    # Beyond a handful of runs an inside legend hides the curves: move it out.
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title=title)
    else:
        ax.legend(fontsize="small", title=title)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    # tab10's hues are the most distinguishable; past ten the line style
    # changes instead of falling back to tab20's near-identical light pairs.
    return [colormaps["tab10"](i % 10) for i in range(n)]


def _style(i: int) -> str:
    return ("-", "--", ":", "-.")[i // 10 % 4]


def _line_plot(
    runs: list,
    key: str,
    path: Path,
    title: str,
    ylabel: str,
    empty: str,
    x_time: bool = False,
    baseline: tuple[str, str] | None = None,
) -> None:
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
            ax.plot(
                xs,
                [v for _, _, v in pts],
                marker=marker,
                markersize=3,
                linewidth=1.6,
                color=color,
                linestyle=style,
                label=label,
            )
            drawn += 1
    if drawn:
        _legend(ax, drawn)
    else:
        _empty(ax, empty)
    _save(fig, path)


def _genre_figure(runs: list, genres: dict[str, str]):
    """Final val loss per genre: one group of bars per genre, a bar per run;
    a loss from fewer than MIN_GENRE_TOKENS tokens hatched and pale."""
    from matplotlib.patches import Patch

    fig, ax = _figure("Final validation loss by genre", "genre", "val loss (nats/token)")
    drawn = [r for r in runs if any(r.genre_loss.get(g) is not None for g in genres)]
    if not drawn:
        _empty(ax, "no per-genre validation loss logged (val/loss_<genre>)")
        return fig
    width = 0.8 / len(drawn)
    colors = dict(zip((r.label for r in runs), _colors(len(runs))))
    few = False
    for j, r in enumerate(drawn):
        xs = [i + (j - (len(drawn) - 1) / 2) * width for i in range(len(genres))]
        bars = ax.bar(xs, [r.genre_loss.get(g, math.nan) for g in genres], width=width * 0.95, color=colors[r.label])
        for bar, g in zip(bars, genres):
            if r.genre_tokens.get(g, MIN_GENRE_TOKENS) < MIN_GENRE_TOKENS:
                bar.set_hatch("///")
                bar.set_alpha(0.45)
                few = True
    ax.set_xticks(range(len(genres)), [f"{name} ({g})" for g, name in genres.items()])
    ax.grid(False, axis="x")
    handles = [Patch(color=colors[r.label], label=r.label) for r in drawn]
    if few:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label=f"< {MIN_GENRE_TOKENS} tokens"))
    # Outside the axes: once the bars fill the height, any place inside covers one.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="run")
    return fig


def _throughput_figure(runs: list, note: str):
    """A bar per run in the run's colour of every other plot, grouped by
    hardware (named under each bar), with its spread over log intervals."""
    fig, ax = _figure(
        "Training throughput by hardware (median after the first log interval; bars: quartiles)",
        "run (hardware)",
        "samples / second",
    )
    colors = dict(zip((r.label for r in runs), _colors(len(runs))))
    bars = sorted(
        (r for r in runs if r.row["samples_per_sec"] is not None),
        key=lambda r: (r.row["hardware"] or "", -r.row["samples_per_sec"]),
    )
    if not bars:
        _empty(ax, "no throughput metrics logged (samples_per_sec)")
        return fig
    for i, r in enumerate(bars):
        value = top = r.row["samples_per_sec"]
        ax.bar(i, value, width=0.7, color=colors[r.label])
        if len(r.throughput) >= 3:  # the run's own spread over its log intervals
            import statistics

            q1, _, q3 = statistics.quantiles(r.throughput, n=4)
            ax.errorbar(i, value, yerr=[[max(0.0, value - q1)], [max(0.0, q3 - value)]], color="0.2", capsize=4)
            top = max(value, q3)
        # Above the error bar's cap, which it would otherwise cross.
        ax.annotate(
            f"{value:,.1f}",
            (i, top),
            ha="center",
            va="bottom",
            fontsize="small",
            xytext=(0, 3),
            textcoords="offset points",
        )
    # Names wrapped, not tilted: a tilted two-line label runs into its neighbours and the note.
    tilt = len(bars) > 8
    labels = [f"{textwrap.fill(r.label, 18)}\n({r.row['hardware'] or 'unknown'})" for r in bars]
    ax.set_xticks(range(len(bars)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    pad = max(0.0, (4 - len(bars)) / 2)  # one or two bars would otherwise fill the whole width
    ax.set_xlim(-0.5 - pad, len(bars) - 0.5 + pad)
    ax.set_xlabel(f"run (hardware)\n\n{textwrap.fill(note, 110)}", fontsize="small")  # laid out below the labels
    return fig


def write_plots(runs: list, genres: dict[str, str], note: str, out: Path, font: Font) -> list[Path]:
    """Every plot in PLOTS, into `out`; `genres` maps ASCII metric names to the genres' own names."""
    paths = [out / name for name in PLOTS]
    with cjk_fonts(font):
        _line_plot(
            runs,
            "train/loss",
            paths[0],
            "Training loss by step",
            "train loss (nats/token)",
            "no training loss logged (train/loss)",
        )
        _line_plot(
            runs,
            "val/loss",
            paths[1],
            "Validation loss by step",
            "val loss (nats/token)",
            "no validation loss logged (val/loss)",
        )
        _line_plot(
            runs,
            "val/loss",
            paths[2],
            "Validation loss by wall time",
            "val loss (nats/token)",
            "no validation loss logged (val/loss)",
            x_time=True,
        )
        _save(_genre_figure(runs, genres), paths[3])
        _save(_throughput_figure(runs, note), paths[4])
        _line_plot(
            runs,
            "val/samples/rep4",
            paths[5],
            "Repetition in generated samples",
            "repeated 4-gram rate (val/samples/rep4)",
            "no repetition metrics logged (val/samples/rep4)",
            baseline=("val/samples/greedy_rep4", "(greedy, no penalty)"),
        )
    return paths


def warn_no_font(font: Font) -> None:
    if font.family is None:
        print(f"warning: no CJK font for the plots; {font.source}", file=sys.stderr)
