"""Timing the CPU calibration's candidates (lingmao.plan.calibration) with
the run's own training step: its model, optimizer and loss, built by
train.step as the engine builds it, on random tokens at the calibration's
micro-batch, in alternating rounds so that a load that comes and goes hits
every candidate alike."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lingmao.plan import Plan
from lingmao.plan.calibration import ROUNDS, choose, expected_seconds, name, shape_of
from lingmao.plan.make import DEFAULT_VOCAB
from lingmao.train.distributed import Dist
from lingmao.train.step import build_step


def cpu_choice(cfg, plan: Plan, cache_dir: Path, measure: bool) -> dict | None:
    """The calibration's answer for `plan` (cached, or measured now unless
    `measure` is False), or None where the plan leaves nothing to decide."""
    if not plan.cpu_candidates:
        return None
    model = OmegaConf.to_container(cfg.model) if OmegaConf.is_config(cfg.model) else asdict(cfg.model)
    shape = shape_of(model, DEFAULT_VOCAB, plan.threads, cfg.optim.name)
    run_s = expected_seconds(cfg.trainer.max_time, cfg.trainer.max_steps, plan.est_step_seconds)
    fn = (lambda s, cand: measure_steps(cfg, plan, s, cand)) if measure else None
    return choose(shape, plan.cpu_candidates, cache_dir, run_s, fn)


def measure_steps(cfg, plan: Plan, shape: dict, candidates, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds per training step of each candidate ("fp32", "bf16+compile", ...);
    a candidate that fails to build or run (no C++ compiler for inductor, say) is left out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(shape["threads"])
    try:
        steps = {}
        for p, c in candidates:
            try:
                steps[name(p, c)] = _stepper(cfg, plan, shape, p, c)
            except Exception:  # noqa: BLE001 - any failure rules the candidate out, nothing more
                if (p, c) == ("fp32", False):
                    raise
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(rounds):
            for k, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        torch.set_num_threads(threads)


def _stepper(cfg, plan: Plan, shape: dict, precision: str, compile_: bool):
    """One training step of the run's step at this precision and compile, on
    one batch of random tokens, its first calls done (compilation and
    first-touch costs stay out of the timing)."""
    micro = shape["micro_batch"]
    timed = replace(plan, precision=precision, compile=compile_, micro_batch=micro, accumulation=1, grad_scaler=False)
    parts = build_step(cfg, timed, shape["vocab_size"], torch.device("cpu"), Dist())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape["vocab_size"], (micro, plan.context_length + 1), generator=g)
    batches = itertools.repeat((x[:, :-1], x[:, 1:]))

    def step() -> None:
        parts.step.step(batches, plan.lr)

    step()
    step()
    return step
