"""Timing the CPU calibration's candidates (lingmao.plan.calibration) with
the run's own training step: its model, optimizer and loss, built by
train.step as the engine builds it, on random tokens at the calibration's
micro-batch, in alternating rounds so that a load that comes and goes hits
every candidate alike."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lingmao.plan import Plan
from lingmao.plan.calibration import (
    CACHE_NAME,
    COMPILE_GAIN,
    COMPILE_SECONDS,
    LIMIT,
    LIMIT_SHARE,
    MARGIN,
    ROUNDS,
    SLOWER,
    choose,
    expected_seconds,
    name,
    shape_of,
)
from lingmao.plan.make import DEFAULT_VOCAB
from lingmao.train.distributed import Dist
from lingmao.train.step import build_step


def cpu_choice(cfg, plan: Plan, cache_dir: Path, measure: bool, say=print) -> dict | None:
    """The calibration's answer for `plan` (cached, or measured now unless
    `measure` is False), or None where the plan leaves nothing to decide."""
    if not plan.cpu_candidates:
        return None
    model = OmegaConf.to_container(cfg.model) if OmegaConf.is_config(cfg.model) else asdict(cfg.model)
    shape = shape_of(model, DEFAULT_VOCAB, plan.threads, cfg.optim.name)
    run_s = expected_seconds(cfg.trainer.max_time, cfg.trainer.max_steps, plan.est_step_seconds)
    limit = time_limit(run_s)

    def timed(s: dict, cand) -> dict[str, float]:
        say(
            f"precision: measuring {', '.join(name(*pc) for pc in cand)} on this CPU "
            f"(at most ~{limit:.0f} s, once: the answer is cached in {Path(cache_dir) / CACHE_NAME})"
        )
        return measure_steps(cfg, plan, s, cand, limit=limit, say=say)

    return choose(shape, plan.cpu_candidates, cache_dir, run_s, timed if measure else None)


def time_limit(run_seconds: float | None) -> float:
    """Seconds the measurement may take: LIMIT_SHARE of the run, at most LIMIT."""
    return LIMIT if run_seconds is None else min(LIMIT, LIMIT_SHARE * run_seconds)


def measure_steps(
    cfg, plan: Plan, shape: dict, candidates, rounds: int = ROUNDS, limit: float = LIMIT, say=print
) -> dict[str, float]:
    """Median seconds per training step of each candidate ("fp32", "bf16+compile", ...),
    eager ones first. A candidate that fails to build or run (no C++ compiler for
    inductor, say), one that cannot win (SLOWER times the best warm step, or by
    what compile gained elsewhere) and one the `limit` leaves no time for are
    inf: measured, and not the answer."""
    began, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(shape["threads"])
    try:
        steps, warm, out = {}, {}, {}
        compiled = COMPILE_SECONDS  # what building a compiled step takes: a guess until one was timed
        order = sorted(candidates, key=lambda pc: (pc[1], pc[0] != "fp32"))  # fp32 eager first: the baseline
        for i, (p, c) in enumerate(order, 1):
            k, t0 = name(p, c), time.perf_counter()
            why = _passed_over(k, warm, limit - (t0 - began), compiled if c else 0.0)
            if why and k != "fp32":
                out[k] = math.inf
                say(f"  {i}/{len(order)} {k}: not timed, {why}")
                continue
            try:
                steps[k], warm[k] = _stepper(cfg, plan, shape, p, c)
            except Exception as e:  # noqa: BLE001 - any failure rules the candidate out, nothing more
                if k == "fp32":
                    raise
                out[k] = math.inf
                say(f"  {i}/{len(order)} {k}: failed ({type(e).__name__}), left out")
                continue
            built = time.perf_counter() - t0
            compiled = built if c else compiled
            say(f"  {i}/{len(order)} {k}: {warm[k]:.2f} s a step ({built:.0f} s with its first steps)")
        best = min(warm.values())
        timed = {k: f for k, f in steps.items() if warm[k] <= SLOWER * best}  # the rest cannot win
        out.update({k: warm[k] for k in steps if k not in timed})
        left = limit - (time.perf_counter() - began)
        n = max(1, min(rounds, int(left / sum(warm[k] for k in timed)))) if len(timed) > 1 else 0
        times: dict[str, list[float]] = {k: [warm[k]] for k in timed}
        for _ in range(n):
            for k, step in timed.items():
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
        out.update({k: statistics.median(v) for k, v in times.items()})
        say(f"  measured in {time.perf_counter() - began:.0f} s")
        return out
    finally:
        torch.set_num_threads(threads)


def _passed_over(k: str, warm: dict[str, float], left: float, build: float) -> str | None:
    """Why candidate `k` is not timed: no time left for it (`build`: the
    seconds a compiled one takes to build), or it cannot win."""
    if left <= build:
        need = f"compiling it takes ~{build:.0f} s, " if build else ""
        return f"{need}{max(0.0, left):.0f} s of the limit left"
    if k == "bf16+compile" and "bf16" in warm:
        gain = warm["fp32"] / warm["fp32+compile"] if "fp32+compile" in warm else COMPILE_GAIN
        best = min(warm.values())
        if warm["bf16"] / gain > best * (1 - MARGIN):  # compile would have to gain more than it did for fp32
            return f"bf16 eager is {warm['bf16'] / warm['fp32']:.2f}x fp32's step and compile gains ~{gain:.2f}x"
    return None


def _stepper(cfg, plan: Plan, shape: dict, precision: str, compile_: bool):
    """One training step of the run's step at this precision and compile, on
    one batch of random tokens, and the seconds of its second call (the first
    compiles and touches the memory first)."""
    micro = shape["micro_batch"]
    timed = replace(plan, precision=precision, compile=compile_, micro_batch=micro, accumulation=1, grad_scaler=False)
    parts = build_step(cfg, timed, shape["vocab_size"], torch.device("cpu"), Dist())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape["vocab_size"], (micro, plan.context_length + 1), generator=g)
    batches = itertools.repeat((x[:, :-1], x[:, 1:]))

    def step() -> None:
        parts.step.step(batches, plan.lr)

    step()
    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0
