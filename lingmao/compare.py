"""Compare tracked runs: a terminal table, runs.csv, plots and index.html.

    lingmao compare [SELECTOR ...] [tracking_uri=URI] [out=DIR]

A SELECTOR is an experiment name, an experiment id, a Hydra sweep dir (the
`sweep.dir` tag of multirun jobs) or a run id. With none, the runs of the
experiment "lingmao" are compared, or of the newest experiment if there is no
"lingmao".

The report itself (selecting runs, the table, plots and page) is built by
lingmao.report; this module is the command line on top of it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lingmao.config.options import OptionError, doc, parse, usage
from lingmao.report.build import compare
from lingmao.report.collect import DEFAULT_EXPERIMENT, CompareError
from lingmao.tracking.store import StoreError


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
