"""What every suite shares: its state (Suite), running its parts, and their
results as results.json and MLflow metrics. The suites themselves: cpu.py
(and overhead.py, its first part), gpu.py, speedrun.py."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lingmao.bench.compose import Composer
from lingmao.bench.options import BenchOptions
from lingmao.plan.make import runnable_plan
from lingmao.tracking.tracker import Tracker

CPU_BUDGET_SECONDS = 300


@dataclass
class Suite:
    name: str
    composer: Composer
    cfg: object
    plan: object
    machine: object
    opts: BenchOptions
    tracker: Tracker
    out: Path = Path()
    results: dict = field(default_factory=dict)

    def variant(self, model: str | None = None, groups: dict | None = None, **values):
        """(cfg, plan) of the command line with these group choices and values on top."""
        cfg = self.composer.compose({**(groups or {}), **({"model": model} if model else {})}, values)
        return cfg, runnable_plan(cfg, self.machine)


def silent_tracker() -> Tracker:
    return Tracker(None, "", "", enabled=False)


def numeric_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """Numbers (and flags, as 0/1) of nested results as MLflow metrics: part/key/..."""
    out = {}
    for key, value in results.items():
        name = prefix + re.sub(r"[^\w\-. :/]", "_", str(key))  # the characters MLflow allows in a name
        if isinstance(value, dict):
            out.update(numeric_metrics(value, name + "/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


def run_suite(s: Suite, parts: dict) -> None:
    s.out = Path(s.opts.out or Path("outputs") / "bench" / f"{datetime.now():%Y-%m-%d/%H-%M-%S}").resolve()
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"suite={s.name} | {len(parts)} part(s) | output {s.out}")
    if {"engine", "data", "startup"} & set(parts):
        from lingmao.data import load_corpus

        t = time.perf_counter()
        load_corpus(s.cfg.data, progress=s.cfg.trainer.progress)
        print(
            f"corpus ready in {time.perf_counter() - t:.1f} s (prepared on the first run only, then cached; "
            f"not counted below)"
        )
    start = time.perf_counter()
    for key, (title, fn) in parts.items():
        print(f"\n== {title} ==")
        t = time.perf_counter()
        s.results[key] = fn(s)
        s.results[key]["seconds"] = time.perf_counter() - t
        print(f"({s.results[key]['seconds']:.0f} s)")
        s.tracker.log_metrics(numeric_metrics({key: s.results[key]}), 0)
        sys.stdout.flush()
    total = time.perf_counter() - start
    s.results["total_seconds"] = total
    (s.out / "results.json").write_text(json.dumps(s.results, indent=2, default=str))
    s.tracker.log_metrics({"total_seconds": total}, 0)
    s.tracker.log_artifact(s.out / "results.json")
    print(
        f"\nsummary: suite={s.name}, {total:.0f} s"
        + (f" (goal < {CPU_BUDGET_SECONDS} s on 2 cores)" if s.name == "cpu" else "")
    )
    for key, (title, _) in parts.items():
        print(f"  {title}: {s.results[key]['summary']}")
    print(f"results: {s.out / 'results.json'}")
