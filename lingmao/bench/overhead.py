"""suite=cpu part 1, engine overhead: the full engine against the bare
reference loop (bare.py) on the same model, batches and schedule. Its
tokens/s ratio comes from paired blocks (stats.py), and the two must compute
the same losses for 20 steps."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from statistics import median

from lingmao.bench.stats import block_order, compare, pair_up
from lingmao.bench.suite import Suite
from lingmao.tracking.tracker import Tracker


class EndOfSteps(Exception):
    """Raised by RecordingTracker once the engine has logged its last wanted step."""


class RecordingTracker(Tracker):
    """A Tracker that also keeps the engine's per-step training losses.

    `on_train_log(step)` runs after each train/loss log, inside the engine's
    loop. With `stop_at`, the train/loss log of that step raises EndOfSteps
    (so may on_train_log), which ends engine.train there: its closing eval
    and checkpoint lie outside the steps measured and would cost more than
    the steps themselves (the per-genre validation alone takes seconds on a
    small CPU)."""

    def __init__(self, *args, stop_at: int | None = None, on_train_log=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.on_train_log = stop_at, on_train_log
        self.losses: list[float] = []

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if "train/loss" not in metrics:
            return
        self.losses.append(metrics["train/loss"])
        if self.on_train_log:
            self.on_train_log(step)
        if self.stop_at is not None and step >= self.stop_at:
            raise EndOfSteps


def train_steps(cfg, plan, tracker: RecordingTracker, run_dir: Path, log: Path) -> None:
    """engine.train until the tracker stops it; its prints and progress bar go to `log`, not the report."""
    from lingmao.train import engine

    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(log, "a") as f,
        contextlib.redirect_stdout(f),
        contextlib.redirect_stderr(f),
        contextlib.suppress(EndOfSteps),
    ):
        engine.train(cfg, plan, tracker, run_dir)


def engine_settings(steps: int, log_every: int, progress: bool) -> dict:
    """An engine run of `steps` steps with no eval or checkpoint before the
    end (where RecordingTracker stops it)."""
    return {
        "trainer.max_steps": steps,
        "trainer.max_epochs": None,
        "trainer.max_time": None,
        "trainer.log_every": log_every,
        "trainer.eval_every": steps,
        "trainer.progress": progress,
        "checkpoint.every_steps": None,
        "checkpoint.every_minutes": None,
        "resume": "never",
    }


# --- the part ---

LOSS_STEPS = 20


def engine_variant(s: Suite, **values):
    """(cfg, plan) of the measured model: bench.engine_model with accumulation 1."""
    return s.variant(s.opts.engine_model, **{"hardware.accumulation": 1}, **values)


def bare_loop(s: Suite, cfg, plan, total_steps: int):
    from lingmao.bench.bare import BareLoop
    from lingmao.bench.measure import train_tokens
    from lingmao.data.windows import TokenWindows

    tokens, vocab, stride, _ = train_tokens(cfg, False, s.opts.vocab, 0)
    return BareLoop(cfg, plan, TokenWindows(tokens, cfg.model.context_length, stride), vocab, total_steps)


def loss_check(s: Suite, steps: int, run_dir: Path) -> tuple[list, list]:
    """Per-step training losses of the engine and of the bare loop, same seed."""
    cfg, plan = engine_variant(s, **engine_settings(steps, 1, progress=False))
    tracker = RecordingTracker(None, "", "", enabled=False, stop_at=steps)
    train_steps(cfg, plan, tracker, run_dir, run_dir.parent / "engine.log")
    bare = bare_loop(s, cfg, plan, total_steps=steps)
    return tracker.losses, [bare.step().item() for _ in range(steps)]


def engine_blocks(s: Suite, bare, work: Path) -> tuple[str, list[float], list[float], int]:
    """(block order, tokens/s of each block in that order, block seconds, steps per engine block).

    One engine run serves every engine block: it logs once per block
    (trainer.log_every = a block's steps), and the bare blocks that the order
    puts next run inside that log call, so the two contenders alternate in one
    process and the engine's start-up (MLflow run, corpus checks) is paid
    once. An engine block is the wall time from the end of one such call to
    the end of the engine's next log: its steps with all the engine does
    around them (loader, loss sync, metrics, logging, progress bar)."""
    # Warm-up and calibration: an engine block's steps are fixed in advance,
    # sized by the faster of two bare blocks to last block_seconds or more.
    step_s = min(bare.tokens_per_step / bare.run_for(s.opts.block_seconds) for _ in range(2))
    log_every = max(1, math.ceil(1.1 * s.opts.block_seconds / step_s))
    order = block_order(s.opts.pairs)
    values: list[float] = []
    spans: list[float] = []
    resumed: list[float] = []  # when the engine got control back after a log call

    def between_engine_blocks(step: int) -> None:
        now = time.perf_counter()
        if resumed:  # the first log ends the engine's start-up interval, not a block
            values.append(log_every * bare.tokens_per_step / (now - resumed[-1]))
            spans.append(now - resumed[-1])
        while len(values) < len(order) and order[len(values)] == "b":
            start = time.perf_counter()
            values.append(bare.run_for(s.opts.block_seconds))
            spans.append(time.perf_counter() - start)
        if len(values) == len(order):
            raise EndOfSteps
        resumed.append(time.perf_counter())

    steps = log_every * (order.count("a") + 1)
    cfg, plan = engine_variant(s, **engine_settings(steps, log_every, progress=True))
    tracker = RecordingTracker(
        f"sqlite:///{work / 'engine_run.db'}",
        "lingmao-bench-engine",
        "engine-blocks",
        on_train_log=between_engine_blocks,
    )
    train_steps(cfg, plan, tracker, work / "run", work / "engine.log")
    tracker.end()
    shutil.rmtree(work / "run")
    return order, values, spans, log_every


def engine_overhead(s: Suite) -> dict:
    """The full engine (tracking to a scratch MLflow store, progress bar on)
    against the bare loop: same model, batch, precision, data and schedule.
    model=tiny (bench.engine_model) with accumulation 1: the shortest steps,
    where per-step overhead shows most."""
    work = s.out / "engine"
    work.mkdir(parents=True, exist_ok=True)
    eng, bare_losses = loss_check(s, LOSS_STEPS, work / "losses")
    diff = max(abs(a - b) for a, b in zip(eng, bare_losses))
    equal = len(eng) == len(bare_losses) == LOSS_STEPS and diff <= 1e-6 * max(abs(x) for x in eng)
    cfg, plan = engine_variant(s)
    print(
        f"losses, {LOSS_STEPS} steps, seed {cfg.seed}: {'equal' if equal else 'DIFFERENT'} "
        f"(max |engine - bare| = {diff:.2e}; engine {eng[0]:.4f} -> {eng[-1]:.4f})"
    )

    order, values, spans, log_every = engine_blocks(s, bare_loop(s, cfg, plan, cfg.trainer.max_steps), work)
    paired = pair_up(order, values)
    verdict = compare(paired)
    print(verdict.describe("engine/bare tokens/s"))
    print(
        f"median tokens/s: engine {median(paired.a):,.0f}, bare {median(paired.b):,.0f} | model={cfg.model.name}, "
        f"micro-batch {plan.micro_batch}, context {cfg.model.context_length}, {plan.precision}; {log_every} steps "
        f"per engine block (trainer.log_every), shortest block {min(spans):.2f} s"
    )
    ratio = f"{verdict.ratio}" if verdict.conclusive else "inconclusive (the control moved)"
    summary = f"engine/bare tokens/s {ratio}; losses {'equal' if equal else 'DIFFERENT'} for {LOSS_STEPS} steps"
    return {
        "summary": summary,
        "losses_equal": equal,
        "loss_max_abs_diff": diff,
        "loss_first": eng[0],
        "loss_last": eng[-1],
        "ratio": verdict.ratio.median,
        "ratio_low": verdict.ratio.low,
        "ratio_high": verdict.ratio.high,
        "control": verdict.control.median,
        "control_low": verdict.control.low,
        "control_high": verdict.control.high,
        "conclusive": verdict.conclusive,
        "engine_tokens_per_sec": median(paired.a),
        "bare_tokens_per_sec": median(paired.b),
        "shortest_block_seconds": min(spans),
        "log_every": log_every,
        "pairs": len(paired.ratios),
    }
