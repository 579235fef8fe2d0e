"""The Python steps of scripts/gpu_check.sh.

    python scripts/gpu_check.py smoke RESULTS -- OVERRIDES...   `python -m lingmao.run OVERRIDES`, then what it imported
    python scripts/gpu_check.py bench RESULTS -- OVERRIDES...   a short bare-loop benchmark on CUDA
    python scripts/gpu_check.py table RESULTS                   the one table of the whole check

RESULTS is a JSONL file. The steps write rows {"check", "result", "numbers"};
tests/test_gpu.py writes {"check", "test", "numbers"} before it asserts, and
gpu_pytest_plugin {"test", "outcome", "message"} once the test has ended.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
import time
from pathlib import Path

# What a run with tracking off and a prepared corpus must never import: the GPU
# machine has none of them, and each costs seconds of start-up where it exists.
NOT_IMPORTED = ("mlflow", "datasets", "opencc")


def add_row(results: Path, check: str, result: str, **numbers) -> None:
    with open(results, "a") as f:
        f.write(json.dumps({"check": check, "result": result, "numbers": numbers}, default=str) + "\n")


def plan_words(p: dict) -> str:
    """The plan a step ran, in a few words, for its row of the table."""
    compiled = " compile" if p["compile"] else ""
    return (
        f"{p['preset']} {p['device']} {p['micro_batch']}x{p['accumulation']}x{p['world_size']} "
        f"{p['precision']}{compiled} est {p['estimate_gb']} GB"
    )


def checkpoint_plan(run_dir: Path) -> str | None:
    """plan_words of the plan a run's last checkpoint holds; None without one."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    import torch

    return plan_words(torch.load(last, map_location="cpu", weights_only=True)["plan"])


def imported(prefixes: tuple[str, ...] = NOT_IMPORTED) -> list[str]:
    """Top-level packages among `prefixes` that this process has imported."""
    return sorted({name.split(".")[0] for name in sys.modules} & set(prefixes))


def smoke(results: Path, overrides: list[str]) -> int:
    """The composed command as a user types it, in this process (so its
    imports can be read afterwards): exit code, seconds, forbidden imports."""
    sys.argv = ["lingmao", *overrides]
    start = time.perf_counter()
    code = 0
    try:
        runpy.run_module("lingmao.run", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    seconds = time.perf_counter() - start
    bad = imported()
    ok = code == 0 and not bad
    run_dir = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("hydra.run.dir=")), None)
    add_row(
        results,
        "smoke: python -m lingmao.run (tracking off, data=prepared)",
        "passed" if ok else "FAILED",
        exit=code,
        seconds=round(seconds, 1),
        imported=",".join(bad) or "none of " + "/".join(NOT_IMPORTED),
        plan=checkpoint_plan(run_dir) if run_dir else None,
    )
    if bad:
        print(
            f"gpu_check: the run imported {', '.join(bad)}; with tracking.enabled=false and data=prepared it must not",
            file=sys.stderr,
        )
    return 0 if ok else 1


def bench(results: Path, overrides: list[str], steps: int = 20, warmup: int = 5) -> int:
    """The bare training loop (no engine around it) of the composed run,
    timed: its MFU against this GPU's datasheet peak and a bf16 matmul
    measured here, beside the engine's MFU from the tests."""
    import torch

    from lingmao.bench.compose import Composer
    from lingmao.bench.measure import benchmark, train_tokens
    from lingmao.bench.suite import silent_tracker
    from lingmao.plan.machine import detect
    from lingmao.plan.make import runnable_plan
    from lingmao.plan.peaks import dense_bf16_tflops
    from lingmao.train.backend import apply_runtime

    cfg = Composer(overrides).compose()
    plan = runnable_plan(cfg, detect())
    apply_runtime(plan)
    name = torch.cuda.get_device_name() if plan.device == "cuda" else plan.device
    dense = dense_bf16_tflops(name) if plan.device == "cuda" else None
    peaks = {f"{name} datasheet": dense} if dense else {}
    tokens, vocab, stride, source = train_tokens(cfg, False, 0, 0)
    r = benchmark(
        cfg,
        plan,
        tokens,
        vocab,
        stride,
        steps=steps,
        warmup=warmup,
        tracker=silent_tracker(),
        peaks=peaks,
        label="bench",
    )
    print(
        f"bench: {cfg.model.name}, context {r.context_length}, micro-batch {r.micro_batch} x {r.accumulation}, "
        f"{r.precision}{' compiled' if r.compile else ''}, {source}"
    )
    print("\n".join(r.lines()))
    mfus = {f"mfu_{'datasheet' if i == 0 and dense else 'matmul'}": r.mfu(k) for i, k in enumerate(r.peaks)}
    add_row(
        results,
        f"bench: bare loop {cfg.model.name} ctx {r.context_length} {r.precision}{' compile' if r.compile else ''}",
        "passed",
        **mfus,
        tokens_per_sec=round(r.tokens_per_sec),
        achieved_tflops=r.achieved_tflops,
        peak_gb=r.peak_memory_bytes / 2**30,
        data_wait=r.data_share,
        plan=plan_words(plan.as_dict()),
    )
    return 0


def outcomes(lines: list[dict]) -> dict[str, str]:
    """Test name -> passed | FAILED: message | ERROR: message | skipped: reason,
    from the rows gpu_pytest_plugin wrote; a failure outranks a pass."""
    out: dict[str, str] = {}
    for row in lines:
        if "outcome" in row:
            verdict = row["outcome"] + (f": {row['message']}" if row.get("message") else "")
            if out.get(row["test"], "passed").startswith("passed"):
                out[row["test"]] = verdict
    return out


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def rows(results: Path) -> list[tuple[str, str, str]]:
    """(check, result, numbers) per row: the steps' and the tests' rows in the
    order written, then every test that recorded no numbers."""
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    verdicts = outcomes(lines)
    table, seen = [], set()
    for row in lines:
        if "check" not in row:
            continue
        test = row.get("test")
        seen.add(test)
        result = row.get("result") or verdicts.get(test, "no outcome (stopped before it ended)")
        numbers = ", ".join(f"{k} {fmt(v)}" for k, v in row["numbers"].items() if v is not None)
        table.append((row["check"], result, numbers))
    table += [(name, verdict, "") for name, verdict in verdicts.items() if name not in seen]
    return table


def table(results: Path) -> int:
    """Print the table; exit 1 if any row is not passed or skipped."""
    body = rows(results)
    if not body:
        print("gpu_check: no results")
        return 1
    w_check = max(len(c) for c, _, _ in body)
    w_result = min(60, max(len(r) for _, r, _ in body))
    print(f"{'check':<{w_check}}  {'result':<{w_result}}  numbers")
    print(f"{'-' * w_check}  {'-' * w_result}  {'-' * 7}")
    for check, result, numbers in body:
        print(f"{check:<{w_check}}  {result[:w_result]:<{w_result}}  {numbers}")
    bad = [c for c, r, _ in body if not r.startswith(("passed", "skipped"))]
    not_ok = f"; not: {', '.join(bad)}" if bad else ""
    print(f"{len(body) - len(bad)} of {len(body)} checks passed or skipped{not_ok}")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("smoke", "bench", "table"):
        print(__doc__, file=sys.stderr)
        return 2
    command, results, rest = argv[0], Path(argv[1]), argv[2:]
    if command == "table":
        return table(results)
    overrides = rest[1:] if rest[:1] == ["--"] else rest
    if command == "smoke":
        return smoke(results, overrides)
    short = os.environ.get("GPU_CHECK_REHEARSAL") == "1"  # the rehearsal times the harness, not the device
    return bench(results, overrides, steps=5 if short else 20, warmup=2 if short else 5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lingmao from this checkout
    sys.exit(main(sys.argv[1:]))
