"""The compare report's index.html: notes, the runs table, the plots, the
last samples of each run and where to look in the MLflow UI."""

from __future__ import annotations

import html
from pathlib import Path

SAMPLES_SHOWN = 3  # of each run's last eval

_CSS = """body{font-family:system-ui,"Noto Sans CJK SC","Source Han Sans SC",sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;margin:1em 0;display:block}code,pre{background:#f4f4f4;padding:2px 4px}
pre.poem{white-space:pre-wrap;font-size:15px;line-height:1.5}p.note{color:#555}"""


def samples_html(samples: list[tuple[str, list[dict]]]) -> str:
    """(run label, its last eval's samples) -> the sampled texts, prompt in
    bold; the greedy baseline is a loop diagnostic, not a sample to read."""
    e = html.escape
    parts = []
    for label, rows in samples:
        shown = [s for s in rows if s.get("decoding", "sampled") == "sampled"][:SAMPLES_SHOWN]
        if not shown:
            continue
        poems = "".join(f'<pre class="poem"><b>{e(s.get("prompt", ""))}</b>{e(s.get("text", ""))}</pre>' for s in shown)
        parts.append(f"<h3>{e(label)} <small>(step {e(str(shown[0].get('step', '?')))})</small></h3>\n{poems}\n")
    if not parts:
        return ""
    return (
        '<h2>Last samples</h2>\n<p class="note">The prompt in bold; the samples of each run\'s last '
        "evaluation (artifact samples.jsonl).</p>\n" + "".join(parts)
    )


def write_page(
    path: Path,
    title: str,
    uri: str,
    n_runs: int,
    notes: list[str],
    table: str,
    plots: list[Path],
    samples: list[tuple[str, list[dict]]],
    links: list[str],
) -> None:
    e = html.escape
    images = "".join(
        f'<h2>{e(p.stem.replace("_", " "))}</h2>\n<img src="{e(p.name)}" alt="{e(p.stem)}">\n' for p in plots
    )
    items = "".join(f'<li><a href="{e(url)}">{e(url)}</a></li>' for url in links)
    note_html = "".join(f'<p class="note">{e(n)}</p>\n' for n in notes)
    path.write_text(
        f"""<!doctype html>
<html lang="zh-Hans"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p>{n_runs} runs from <code>{e(uri)}</code>, sorted by final validation loss.
Throughput and MFU are medians of the values logged after the first log interval.
"lr (set)" is optim.lr as given; "lr (batch-scaled)" is what the run trained with.
"5/7-char lines" is the share of sampled 诗 lines with 5 or 7 characters; "corpus 5/7" is the same share
in the corpus's validation split. Machine-readable: <a href="runs.csv">runs.csv</a>.</p>
{note_html}{table}
{images}{samples_html(samples)}<h2>In the MLflow UI</h2>
<pre>mlflow ui --backend-store-uri {e(uri)}</pre>
<p>then open (the train and val charts come first; Group by &rarr; tags hardware or model compares presets):</p>
<ul>{items}</ul>
</body></html>
""",
        encoding="utf-8",
    )
