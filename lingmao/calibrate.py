"""CPU precision and compile chosen by measurement on the machine at hand.

A CPU flag does not predict the speed: bf16 autocast with compile ran at
0.64x fp32 eager on one AVX512-BF16 machine and 1.53x on another. So for
`hardware.precision=auto` / `hardware.compile=auto` on CPU a few steps of
the run's own model shape are timed per candidate (fp32 or bf16, eager or
compiled), in alternating rounds so that a load that comes and goes hits
every candidate alike, and the fastest wins if it beats fp32 eager by more
than MARGIN. The answer is cached per CPU model, torch version and shape,
so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

CANDIDATES = (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True))  # (precision, compile)
MARGIN = 0.05  # a candidate must be this much faster than fp32 eager: less is within timing noise
ROUNDS = 5
CACHE_NAME = "cpu_calibration.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(shape: dict) -> str:
    import torch

    text = json.dumps({"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       **shape}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stepper(shape: dict, precision: str, compile: bool):
    """A function running one training step of `shape` (random tokens), and its first call done."""
    import torch
    import torch.nn.functional as F

    from .model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=shape["vocab_size"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                    n_layers=shape["n_layers"], context_length=shape["context_length"], dropout=0.0,
                    rotary=shape.get("rotary", True))
    raw = GPT(cfg)
    model = torch.compile(raw) if compile else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (shape["micro_batch"], cfg.context_length + 1))
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compilation and first-touch costs stay out of the timing
    step()
    return step


def measure(shape: dict, candidates=CANDIDATES, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds per step of each candidate ("fp32", "bf16+compile", ...)."""
    steps = {name(p, c): _stepper(shape, p, c) for p, c in candidates}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def name(precision: str, compile: bool) -> str:
    return precision + ("+compile" if compile else "")


def decide(seconds: dict[str, float], allowed: list[tuple[str, bool]]) -> dict:
    """The fastest allowed candidate, or fp32 eager unless one beats it by MARGIN."""
    base = seconds["fp32"]
    best = min(allowed, key=lambda pc: seconds[name(*pc)])
    if seconds[name(*best)] > base * (1 - MARGIN):
        best = ("fp32", False)
    return {"precision": best[0], "compile": best[1], "seconds": seconds,
            "speedup": base / seconds[name(*best)]}


def choose(shape: dict, precision: str, compile, cache_dir: Path, measure_fn=measure) -> dict:
    """Precision and compile for this CPU and `shape` (its model keys and
    micro_batch): `precision` is "auto" or fixed, `compile` "auto" or a bool.
    Measured once, then read from cache_dir/CACHE_NAME."""
    allowed = [(p, c) for p, c in CANDIDATES if precision in ("auto", p) and compile in ("auto", c)]
    path = Path(cache_dir) / CACHE_NAME
    key = cache_key(shape)
    known = _read(path).get(key, {})
    wanted = sorted({("fp32", False), *allowed})
    if any(name(*pc) not in known for pc in wanted):
        # fp32 eager is timed again beside the others: a ratio holds only within one measurement
        known = {**known, **measure_fn(shape, wanted)}
        _write(path, {**_read(path), key: known})
    return {**decide(known, allowed), "cached": str(path)}


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
