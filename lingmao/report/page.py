"""The compare report's index.html: notes, the runs table, the plots, the
last samples of every run side by side and where to look in the MLflow UI."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

PER_CELL = 4  # samples shown of one prompt and run: trainer.sample.per_prompt's default

_CSS = """body{font-family:system-ui,"Noto Sans CJK SC","Source Han Sans SC",sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{white-space:nowrap}tr.best td{background:#eef7ee;font-weight:600}div.wide{overflow-x:auto}
img{max-width:100%;margin:1em 0;display:block}code,pre{background:#f4f4f4;padding:2px 4px}
pre.poem{white-space:pre-wrap;font-size:15px;line-height:1.5;margin:0 0 .5em;min-width:14em}p.note{color:#555}"""


@dataclass
class Page:
    title: str
    uri: str
    n_runs: int
    notes: list[str]
    table: str  # the runs table's HTML
    plots: list[Path]
    links: list[tuple[str, str]]  # (how to look, the link) per experiment


def samples_html(samples: list[tuple[str, list[dict]]]) -> str:
    """(run label, its last eval's samples) -> one row per prompt, one column
    per run (in the table's order), the prompt in bold: every prompt of every
    run side by side. The greedy baseline is a loop diagnostic, not a sample
    to read."""
    e = html.escape
    sampled = [(label, [s for s in rows if s.get("decoding", "sampled") == "sampled"]) for label, rows in samples]
    sampled = [(label, rows) for label, rows in sampled if rows]
    if not sampled:
        return ""
    prompts = list(dict.fromkeys(s.get("prompt", "") for _, rows in sampled for s in rows))
    head = "".join(
        f"<th>{e(label)} <small>(step {e(str(rows[0].get('step', '?')))})</small></th>" for label, rows in sampled
    )
    body = []
    for prompt in prompts:
        cells = []
        for _, rows in sampled:
            mine = [s for s in rows if s.get("prompt", "") == prompt][:PER_CELL]
            poems = "".join(f'<pre class="poem"><b>{e(prompt)}</b>{e(s.get("text", ""))}</pre>' for s in mine)
            cells.append(f"<td>{poems or '–'}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>\n")
    return (
        '<h2>Last samples</h2>\n<p class="note">Each run\'s last evaluation (artifact samples.jsonl): a row per '
        f"prompt, up to {PER_CELL} samples of it per run; the prompt in bold.</p>\n"
        f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>\n{"".join(body)}</tbody></table></div>\n'
    )


def write_page(path: Path, page: Page, samples: list[tuple[str, list[dict]]]) -> None:
    e = html.escape
    images = "".join(
        f'<h2>{e(p.stem.replace("_", " "))}</h2>\n<img src="{e(p.name)}" alt="{e(p.stem)}">\n' for p in page.plots
    )
    links = "".join(f'<li><a href="{e(url)}">{e(url)}</a><br><code>{e(line)}</code></li>' for line, url in page.links)
    note_html = "".join(f'<p class="note">{e(n)}</p>\n' for n in page.notes)
    path.write_text(
        f"""<!doctype html>
<html lang="zh-Hans"><head><meta charset="utf-8"><title>{e(page.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{e(page.title)}</h1>
<p>{page.n_runs} runs from <code>{e(page.uri)}</code>, sorted by final validation loss; the best one (lowest)
is marked. "varied" holds each run's values of what the runs vary.
Throughput and MFU are medians of the values logged after the first log interval.
"lr (set)" is optim.lr as given; "lr (batch-scaled)" is what the run trained with.
"5/7-char lines" is the share of sampled 诗 lines with 5 or 7 characters; "corpus 5/7" is the same share
in the corpus's validation split. Machine-readable: <a href="runs.csv">runs.csv</a>.</p>
{note_html}{page.table}
{images}{samples_html(samples)}<h2>In the MLflow UI</h2>
<p>The runs table of these runs, sorted by val/loss, with what they vary as columns (a view saved in the
experiment; the chart view is one click away):</p>
<ul>{links}</ul>
</body></html>
""",
        encoding="utf-8",
    )
