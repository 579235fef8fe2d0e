"""CPU precision and compile chosen by measurement on the machine at hand:
what is measured, the cache of answers, and the rule that decides. The
timing itself trains the run's own step (lingmao.train.calibrate).

A CPU flag does not predict the speed: bf16 autocast with compile ran at
0.64x fp32 eager on one AVX512-BF16 machine and 1.53x on another. So for
`hardware.precision=auto` / `hardware.compile=auto` on CPU, training steps of
the run's own model are timed per candidate (fp32 or bf16, eager or
compiled), in alternating rounds so that a load that comes and goes hits every
candidate alike; the fastest wins if it beats fp32 eager by more than MARGIN.
The answer is cached per CPU model, torch version, threads and shape, so later
runs start at once. A run too short to pay for the measurement takes a cached
answer if there is one, else fp32 eager.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

CANDIDATES = (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True))  # (precision, compile)
MARGIN = 0.05  # a candidate must be this much faster than fp32 eager: less is within timing noise
ROUNDS = 5  # at most, as the time limit allows
LIMIT, LIMIT_SHARE = 60.0, 0.05  # seconds the measurement may take: 5% of the run, at most a minute
SLOWER = 1.5  # a warm step this many times the best one's is not timed further: noise is not that large
COMPILE_GAIN = 1.5  # what compile is taken to gain where fp32+compile was not timed
COMPILE_SECONDS = 30.0  # building a compiled step, until one was timed
TOKENS = 1024  # per timed step: enough rows for the matmuls to behave as in training, few seconds per round
MIN_RUN_SECONDS = 300  # shorter runs do not pay for a measurement (tens of seconds, compilation included)
CACHE_NAME = "cpu_calibration.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shape_of(model: dict, vocab_size: int, threads: int, optimizer: str) -> dict:
    """What the timing depends on: the model section (dropout too: its masks
    cost time), vocabulary, timed micro-batch, threads and the optimizer
    (Muon's Newton-Schulz steps are a large share of a small model's step)."""
    micro = max(1, TOKENS // int(model["context_length"]))
    return {
        "model": {k: v for k, v in model.items() if k != "name"},
        "vocab_size": vocab_size,
        "micro_batch": micro,
        "threads": threads,
        "optimizer": optimizer,
    }


def cache_key(shape: dict) -> str:
    text = json.dumps({"cpu": cpu_model(), "torch": importlib.metadata.version("torch"), **shape}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def name(precision: str, compile: bool) -> str:
    return precision + ("+compile" if compile else "")


def decide(seconds: dict[str, float], allowed: list[tuple[str, bool]]) -> dict:
    """The fastest allowed candidate that was measured, or fp32 eager unless one beats it by MARGIN."""
    base = seconds["fp32"]
    timed = [pc for pc in allowed if name(*pc) in seconds] or [("fp32", False)]
    best = min(timed, key=lambda pc: seconds[name(*pc)])
    if seconds[name(*best)] > base * (1 - MARGIN):
        best = ("fp32", False) if ("fp32", False) in allowed else best
    return {"precision": best[0], "compile": best[1], "seconds": seconds, "speedup": base / seconds[name(*best)]}


def allowed(precision: str, compile) -> list[tuple[str, bool]]:
    """The candidates a fixed precision or compile leaves."""
    return [(p, c) for p, c in CANDIDATES if precision in ("auto", p) and compile in ("auto", c)]


def choose(shape: dict, cand: list, cache_dir: Path, run_seconds: float | None, measure_fn) -> dict:
    """Precision and compile for this CPU and `shape` (shape_of) among the
    candidates `cand` (allowed()); `run_seconds` the run's expected length
    (None: unbounded); `measure_fn(shape, candidates)` -> seconds per step of
    each, None: read the cache only (plan=true). Adds "how": measured |
    cached | too short | not yet measured."""
    path = Path(cache_dir) / CACHE_NAME
    key = cache_key(shape)
    known = _read(path).get(key, {})
    wanted = sorted({("fp32", False), *cand})
    how = "cached"
    if any(name(*pc) not in known for pc in wanted):
        short = run_seconds is not None and run_seconds < MIN_RUN_SECONDS
        if short or measure_fn is None:
            fallback = ("fp32", False) if ("fp32", False) in cand else cand[0]
            return {
                "precision": fallback[0],
                "compile": fallback[1],
                "seconds": None,
                "speedup": None,
                "how": "too short" if short else "not yet measured",
            }
        # every wanted candidate is timed again together: a ratio holds only within one measurement
        known = measure_fn(shape, wanted)
        _write(path, {**_read(path), key: known})
        how = "measured"
    return {
        **decide(known, cand),
        "how": how,
        "cache": str(path),
        "tokens": shape["micro_batch"] * shape["model"]["context_length"],
    }


def expected_seconds(max_time: float | None, max_steps: int | None, step_s: float | None) -> float | None:
    """The run's expected length: trainer.max_time, or the estimated steps' time if shorter."""
    bounds = [x for x in (max_time, step_s and max_steps and step_s * max_steps) if x]
    return min(bounds) if bounds else None


def measured_step_seconds(choice: dict, tokens_per_step: int) -> float:
    """Seconds per optimizer step from the calibration's timing of its winner."""
    return choice["seconds"][name(choice["precision"], choice["compile"])] / choice["tokens"] * tokens_per_step


def describe(choice: dict) -> str:
    """One line for the plan: what was measured and what won."""
    if choice["how"] == "too short":
        return (
            f"not measured: the run is too short to pay for a calibration (runs of {MIN_RUN_SECONDS // 60}+ "
            f"min time each candidate on this CPU once, then reuse the answer)"
        )
    if choice["how"] == "not yet measured":
        return (
            "not measured yet: the run times fp32/bf16, eager/compiled on this CPU first (tens of "
            "seconds, once) and takes the fastest"
        )
    base = choice["seconds"]["fp32"]
    times = ", ".join(
        f"{k} {base / v:.2f}x" if math.isfinite(v) else f"{k} not timed"  # could not win, or no time for it
        for k, v in sorted(choice["seconds"].items())
    )
    return f"{choice['how']} on this CPU, speed vs fp32 eager: {times} (a win needs > {MARGIN:.0%})"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel jobs may measure at once
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
