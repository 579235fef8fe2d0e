"""The benchmark suites.

`suite=cpu` answers issue 4 and 8's questions on a CPU, in under 5 minutes on
2 cores (each part prints its wall time; the total is checked at the end):

    1 engine     engine/bare tokens/s (paired blocks), and equal losses for 20 steps
    2 data       share of step time spent waiting for data, model=small
    3 startup    process start -> first optimizer step: lingmao.run vs a bare script
    5 scaling    tokens/s and peak RSS for tiny/small/medium x context 128/512
    7 precision  bf16 autocast + torch.compile vs fp32 eager, model=tiny (paired blocks)

`suite=gpu` measures MFU on a CUDA device (lingmao/bench/gpu.py).

`suite=speedrun` times each speedrun switch to a target val loss against the
baseline (issue 8 item 6, lingmao/bench/speedrun.py).

Every part starts from the composed command line (hardware, data, optim, any
override) and sets only what its question needs, and prints what it set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import median

from ..plan import runnable_plan
from ..tracking import Tracker
from .compose import Composer, with_values
from .options import BenchOptions, OptionError
from .stats import compare, interleave

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

    def variant(self, model: str, **values):
        cfg = self.composer.compose({"model": model}, values)
        return cfg, runnable_plan(cfg, self.machine)


def silent_tracker() -> Tracker:
    return Tracker(None, "", "", enabled=False)


class EndOfSteps(Exception):
    """Raised by RecordingTracker once the engine has logged its last wanted step."""


class RecordingTracker(Tracker):
    """A Tracker that also keeps each log_metrics call, with the time it was
    made: the engine's per-step losses, and wall-clock marks inside its loop.

    `on_train_log(step)` runs after each train/loss log, inside the engine's
    loop. With `stop_at`, the train/loss log of that step raises EndOfSteps
    (so may on_train_log), which ends engine.train there: its closing eval
    and checkpoint lie outside the steps measured and would cost more than
    the steps themselves (the per-genre validation alone takes seconds on a
    small CPU)."""

    def __init__(self, *args, stop_at: int | None = None, on_train_log=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.on_train_log = stop_at, on_train_log
        self.calls: list[tuple[int, dict, float]] = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics), time.perf_counter()))
        super().log_metrics(metrics, step)
        if "train/loss" not in metrics:
            return
        if self.on_train_log:
            self.on_train_log(step)
        if self.stop_at is not None and step >= self.stop_at:
            raise EndOfSteps

    def train_logs(self) -> list[tuple[int, dict, float]]:
        return [c for c in self.calls if "train/loss" in c[1]]


def train_steps(cfg, plan, tracker: RecordingTracker, run_dir: Path, log: Path) -> None:
    """engine.train until the tracker's stop_at step, its output to `log`."""
    from .. import engine

    run_dir.mkdir(parents=True, exist_ok=True)
    with output_to(log), contextlib.suppress(EndOfSteps):
        engine.train(cfg, plan, tracker, run_dir)


@contextlib.contextmanager
def output_to(path: Path):
    """The engine's prints and progress bar go to a log file, not the report."""
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def engine_settings(steps: int, log_every: int, progress: bool) -> dict:
    """An engine run of `steps` steps with no eval or checkpoint before the
    end (where RecordingTracker stops it)."""
    return {"trainer.max_steps": steps, "trainer.max_epochs": None, "trainer.max_time": None,
            "trainer.log_every": log_every, "trainer.eval_every": steps, "trainer.progress": progress,
            "checkpoint.every_steps": None, "checkpoint.every_minutes": None, "resume": "never"}


# --- 1. engine overhead ---


def loss_check(cfg, plan, windows, vocab_size: int, steps: int, run_dir: Path) -> tuple[list, list]:
    """Per-step training losses of the engine and of the bare loop, same seed."""
    from .bare import BareLoop

    c = with_values(cfg, engine_settings(steps, 1, progress=False))
    tracker = RecordingTracker(None, "", "", enabled=False, stop_at=steps)
    train_steps(c, plan, tracker, run_dir, run_dir.parent / "engine.log")
    engine_losses = [m["train/loss"] for _, m, _ in tracker.train_logs()]
    bare = BareLoop(c, plan, windows, vocab_size, total_steps=steps)
    return engine_losses, [bare.step().item() for _ in range(steps)]


def engine_overhead(s: Suite) -> dict:
    """The full engine (tracking to a scratch MLflow store, progress bar on)
    against the bare loop: same model, batch, precision, data and schedule.
    model=tiny (bench.engine_model) with accumulation 1: the shortest steps,
    where per-step overhead shows most.

    One engine run serves every engine block: it logs once per block
    (trainer.log_every = a block's steps), and the bare blocks that the order
    puts next run inside that log call, so the two contenders alternate in one
    process and the engine's start-up (MLflow run, corpus checks) is paid
    once. An engine block is the wall time from the end of one such call to
    the end of the engine's next log: its steps with all the engine does
    around them (loader, loss sync, metrics, logging, progress bar)."""
    from ..data.windows import TokenWindows
    from .bare import BareLoop
    from .measure import train_tokens
    from .stats import block_order, pair_up

    cfg, plan = s.variant(s.opts.engine_model, **{"hardware.accumulation": 1})
    tokens, vocab, stride, _ = train_tokens(cfg, False, s.opts.vocab, 0)
    ctx = cfg.model.context_length
    windows = TokenWindows(tokens, ctx, stride)
    work = s.out / "engine"
    work.mkdir(parents=True, exist_ok=True)

    eng, bare_losses = loss_check(cfg, plan, windows, vocab, 20, work / "losses")
    diff = max(abs(a - b) for a, b in zip(eng, bare_losses))
    equal = len(eng) == len(bare_losses) == 20 and diff <= 1e-6 * max(abs(x) for x in eng)
    print(f"losses, 20 steps, seed {cfg.seed}: {'equal' if equal else 'DIFFERENT'} "
          f"(max |engine - bare| = {diff:.2e}; engine {eng[0]:.4f} -> {eng[-1]:.4f})")

    bare = BareLoop(cfg, plan, windows, vocab, total_steps=cfg.trainer.max_steps)
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
    tracker = RecordingTracker(f"sqlite:///{work / 'engine_run.db'}", "lingmao-bench-engine", "engine-blocks",
                               on_train_log=between_engine_blocks)
    train_steps(with_values(cfg, engine_settings(steps, log_every, progress=True)), plan, tracker, work / "run",
                work / "engine.log")
    tracker.end()
    shutil.rmtree(work / "run")
    paired = pair_up(order, values)
    verdict = compare(paired)
    print(verdict.describe("engine/bare tokens/s"))
    print(f"median tokens/s: engine {median(paired.a):,.0f}, bare {median(paired.b):,.0f} | model={cfg.model.name}, "
          f"micro-batch {plan.micro_batch}, context {ctx}, {plan.precision}; {log_every} steps per engine block "
          f"(trainer.log_every), shortest block {min(spans):.2f} s")
    ratio = f"{verdict.ratio}" if verdict.conclusive else "inconclusive (the control moved)"
    summary = f"engine/bare tokens/s {ratio}; losses {'equal' if equal else 'DIFFERENT'} over 20 steps"
    return {"summary": summary, "losses_equal": equal, "loss_max_abs_diff": diff, "loss_first": eng[0],
            "loss_last": eng[-1], "ratio": verdict.ratio.median, "ratio_low": verdict.ratio.low, "ratio_high": verdict.ratio.high,
            "control": verdict.control.median, "control_low": verdict.control.low,
            "control_high": verdict.control.high, "conclusive": verdict.conclusive,
            "engine_tokens_per_sec": median(paired.a), "bare_tokens_per_sec": median(paired.b),
            "shortest_block_seconds": min(spans), "log_every": log_every, "pairs": len(paired.ratios)}


# --- 2. data pipeline ---


def data_pipeline(s: Suite) -> dict:
    """Time in next(loader) over the whole step, with the preset's workers,
    on the prepared corpus (its memory map, as training reads it). Context 128
    and accumulation 1: less compute per fetched batch than the preset's 512,
    so the share is if anything overstated."""
    from .measure import benchmark, train_tokens

    cfg, plan = s.variant("small", **{"model.context_length": 128, "hardware.accumulation": 1})
    tokens, vocab, stride, source = train_tokens(cfg, False, s.opts.vocab, 0)
    r = benchmark(cfg, plan, tokens, vocab, stride, steps=3, warmup=1, tracker=silent_tracker(), matmul=False)
    step = sum(r.split.values())
    ok = r.data_share < 0.02
    print(f"data wait {r.split['data'] * 1e3:.2f} ms of a {step * 1e3:,.0f} ms step = {r.data_share:.3%} "
          f"(goal < 2%: {'met' if ok else 'MISSED'}) | {plan.num_workers} workers, micro-batch "
          f"{plan.micro_batch}, context 128, {plan.precision} | {source}")
    return {"summary": f"data wait {r.data_share:.3%} of step time (goal < 2%: {'met' if ok else 'MISSED'})",
            "data_wait_share": r.data_share, "data_wait_seconds": r.split["data"], "step_seconds": step,
            "goal_met": ok, "num_workers": plan.num_workers}


# --- 3. start-up ---


def startup(s: Suite) -> dict:
    """model=tiny as the quick start trains it (the preset's batch and
    accumulation), warm cache: the corpus is prepared, this process has read
    every library both launchers import (so the page cache holds them), and
    the scratch MLflow store in the output folder exists."""
    import lingmao

    from ..data import load_corpus
    from ..tracking import ensure_store
    from .startup import BARE_PHASES, RUN_PHASES, launch, median_phases

    cfg, plan = s.variant("tiny")
    data = load_corpus(cfg.data)
    work = s.out / "startup"
    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(lingmao.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    runs = {"n": 0}

    def run_args() -> list[str]:
        runs["n"] += 1
        return [*s.composer.with_groups({"model": "tiny"}), "trainer.max_steps=1",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"hydra.run.dir={work / 'runs' / str(runs['n'])}"]

    mc = cfg.model
    spec = {"tokens": str(data.dir / "train.bin"), "dtype": data.dtype, "seed": cfg.seed,
            "context_length": mc.context_length, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
            "precision": plan.precision,
            "model": {"vocab_size": data.vocab_size, "d_model": mc.d_model, "n_heads": mc.n_heads,
                      "n_layers": mc.n_layers, "context_length": mc.context_length, "dropout": mc.dropout,
                      "mlp_ratio": mc.mlp_ratio}}
    marks = {"run": [], "bare": []}

    def timed(mode: str) -> float:
        m = launch(mode, run_args() if mode == "run" else spec, Path.cwd(), env, work)
        marks[mode].append(m)
        return m["step"] - m["launch"]

    ensure_store(f"sqlite:///{work / 'mlflow.db'}")  # as a user's second run finds it
    paired = interleave(lambda: timed("run"), lambda: timed("bare"), s.opts.startup_pairs)
    verdict = compare(paired)
    run_s, bare_s = median(paired.a), median(paired.b)
    print(f"process start -> first optimizer step (median of {len(paired.a)}): lingmao.run {run_s:.2f} s, "
          f"bare script {bare_s:.2f} s | model=tiny, micro-batch {plan.micro_batch} x {plan.accumulation}, "
          f"{plan.precision}")
    print(verdict.describe("lingmao.run/bare start-up"))
    run_phases, bare_phases = median_phases(marks["run"], RUN_PHASES), median_phases(marks["bare"], BARE_PHASES)
    for name, spans in (("lingmao.run", run_phases), ("bare script", bare_phases)):
        print(f"  {name}, median per phase:")
        for _, label, seconds in spans:
            print(f"    {seconds:7.3f} s  {label}")
    ok = run_s <= 5.0 and verdict.conclusive and verdict.ratio.median <= 1.25
    ratio = f"{verdict.ratio.median:.2f}x bare" if verdict.conclusive else "ratio inconclusive"
    return {"summary": f"start-up {run_s:.2f} s, {ratio} (goal <= 5 s and <= 1.25x: {'met' if ok else 'MISSED'})",
            "run_seconds": run_s, "bare_seconds": bare_s, "ratio": verdict.ratio.median,
            "ratio_low": verdict.ratio.low, "ratio_high": verdict.ratio.high, "control": verdict.control.median,
            "conclusive": verdict.conclusive, "goal_met": ok,
            "run_phases": {key.replace(":", "_"): seconds for key, _, seconds in run_phases},
            "bare_phases": {key: seconds for key, _, seconds in bare_phases}}


# --- 5. scaling ---

SCALING_MODELS = ("tiny", "small", "medium")
SCALING_CONTEXTS = (128, 512)
SCALING_TOKENS = 256  # tokens per step in every row but context 512's (micro-batch 256 / context, at least 1)


def scaling(s: Suite) -> dict:
    """A few steps per (model, context) on synthetic tokens at the plan's
    precision; the same number of tokens per step in every row, so rows differ
    only in model and context."""
    from .measure import benchmark, train_tokens

    rows = []
    for model in SCALING_MODELS:
        for ctx in SCALING_CONTEXTS:
            batch = max(1, SCALING_TOKENS // ctx)
            cfg, plan = s.variant(model, **{"model.context_length": ctx, "hardware.batch": batch,
                                            "hardware.accumulation": 1})
            tokens, vocab, stride, _ = train_tokens(cfg, True, s.opts.vocab, 8 * batch)
            r = benchmark(cfg, plan, tokens, vocab, stride, steps=2, warmup=1, tracker=silent_tracker(),
                          matmul=False)
            rows.append({"model": model, "params": r.params, "context_length": ctx, "micro_batch": batch,
                         "precision": plan.precision, "tokens_per_sec": r.tokens_per_sec,
                         "step_seconds": sum(r.split.values()), "peak_memory_gb": r.peak_memory_bytes / 2**30,
                         "training_memory_gb": (r.peak_memory_bytes - r.base_memory_bytes) / 2**30,
                         "memory": r.memory_kind})
            print(f"  {model:<7} {r.params / 1e6:7.1f}M  ctx {ctx:4d}  batch {batch:2d}  "
                  f"{r.tokens_per_sec:9,.0f} tokens/s  {rows[-1]['peak_memory_gb']:6.2f} GiB {r.memory_kind} "
                  f"({rows[-1]['training_memory_gb']:.2f} GiB of it for this model)")
    (s.out / "scaling.json").write_text(json.dumps(rows, indent=2))
    png = plot_scaling(rows, s.out / "scaling.png")
    s.tracker.log_artifact(png)
    s.tracker.log_artifact(s.out / "scaling.json")
    table = {f"{r['model']}_ctx{r['context_length']}":
             {k: r[k] for k in ("params", "tokens_per_sec", "peak_memory_gb", "training_memory_gb")} for r in rows}
    return {"summary": f"{len(rows)} rows: table above, {png}", "table": table}


def plot_scaling(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ctx in sorted({r["context_length"] for r in rows}):
        rs = sorted((r for r in rows if r["context_length"] == ctx), key=lambda r: r["params"])
        params = [r["params"] / 1e6 for r in rs]
        speed.plot(params, [r["tokens_per_sec"] for r in rs], "o-", label=f"context {ctx}")
        memory.plot(params, [r["training_memory_gb"] for r in rs], "o-", label=f"context {ctx}")
    speed.set_yscale("log")
    memory_label = f"training memory, GiB ({rows[0]['memory']} - before)"
    for ax, ylabel in ((speed, "tokens / s"), (memory, memory_label)):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"lingmao training on CPU ({rows[0]['precision']}), micro-batch {SCALING_TOKENS} / context (at least 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- 7. CPU precision ---


def cpu_precision(s: Suite) -> dict:
    """bf16 autocast + torch.compile against fp32 eager on what a CPU user
    trains: model=tiny (the quick start's) at the preset's micro-batch,
    accumulation 1 so that a step stays well under a block. Its largest matmul,
    the output head (tokens x d_model x vocabulary), is where bf16 would pay."""
    from ..data.windows import TokenWindows
    from .bare import BareLoop
    from .measure import train_tokens

    shape = {"hardware.accumulation": 1}
    cfg32, plan32 = s.variant("tiny", **shape, **{"hardware.precision": "fp32", "hardware.compile": False})
    cfg16, plan16 = s.variant("tiny", **shape, **{"hardware.precision": "bf16", "hardware.compile": True})
    tokens, vocab, stride, _ = train_tokens(cfg32, True, s.opts.vocab, 4096)
    windows = TokenWindows(tokens, cfg32.model.context_length, stride)
    fp32 = BareLoop(cfg32, plan32, windows, vocab, total_steps=cfg32.trainer.max_steps)
    bf16 = BareLoop(cfg16, plan16, windows, vocab, total_steps=cfg16.trainer.max_steps)
    start = time.perf_counter()
    bf16.step()
    compile_s = time.perf_counter() - start
    bf16.run_for(s.opts.block_seconds)
    fp32.run_for(s.opts.block_seconds)
    paired = interleave(lambda: bf16.run_for(s.opts.block_seconds), lambda: fp32.run_for(s.opts.block_seconds),
                        s.opts.pairs)
    verdict = compare(paired)
    native = s.machine.native_bf16_cpu
    print(verdict.describe("bf16+compile / fp32 eager tokens/s"))
    print(f"median tokens/s: bf16+compile {median(paired.a):,.0f}, fp32 eager {median(paired.b):,.0f} | model=tiny, "
          f"micro-batch {plan32.micro_batch}, context {cfg32.model.context_length} | "
          f"first compiled step {compile_s:.1f} s (with a cold inductor cache that is mostly C++ compilation; "
          f"later runs reuse the kernels) | native bf16 (AMX/AVX512-BF16): {'yes' if native else 'no'}")
    ok = verdict.conclusive and verdict.ratio.median >= 2.0
    goal = f"goal >= 2x: {'met' if ok else 'MISSED'}" if native else "no native bf16 here: the 2x goal does not apply"
    ratio = f"{verdict.ratio.median:.2f}x" if verdict.conclusive else "inconclusive"
    return {"summary": f"bf16+compile / fp32 eager {ratio} ({goal})", "ratio": verdict.ratio.median,
            "ratio_low": verdict.ratio.low, "ratio_high": verdict.ratio.high, "control": verdict.control.median,
            "conclusive": verdict.conclusive, "compile_seconds": compile_s, "native_bf16": native,
            "bf16_tokens_per_sec": median(paired.a), "fp32_tokens_per_sec": median(paired.b)}


CPU_PARTS = {"engine": ("1. engine overhead", engine_overhead), "data": ("2. data pipeline", data_pipeline),
             "startup": ("3. start-up", startup), "scaling": ("5. scaling", scaling),
             "precision": ("7. CPU precision", cpu_precision)}


# --- running a suite ---


def suite_parts(name: str, plan, opts: BenchOptions) -> dict:
    """{key: (title, function)} of the parts to run; refuses before any work
    a suite that does not fit the plan or a part that does not exist."""
    if name == "gpu":
        from .gpu import gpu_suite

        return {"gpu": ("GPU", gpu_suite)}
    if name == "speedrun":
        from .speedrun import chosen, speedrun

        chosen(opts.contenders)  # a bad name is refused before any work
        return {"speedrun": ("6. time to quality (speedrun)", speedrun)}
    if plan.device != "cpu":
        raise OptionError(f"suite=cpu measures the CPU, but hardware={plan.preset} runs on {plan.device}: "
                          f"add hardware=cpu")
    if opts.parts == "all":
        return dict(CPU_PARTS)
    names = [p.strip() for p in opts.parts.split(",") if p.strip()]
    if not names or any(n not in CPU_PARTS for n in names):
        raise OptionError(f"bench.parts={opts.parts!r}: choose 'all' or some of {', '.join(CPU_PARTS)}, "
                          f"comma-separated")
    return {n: CPU_PARTS[n] for n in names}


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
        from ..data import load_corpus

        t = time.perf_counter()
        load_corpus(s.cfg.data, progress=s.cfg.trainer.progress)
        print(f"corpus ready in {time.perf_counter() - t:.1f} s (prepared on the first run only, then cached; "
              f"not counted below)")
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
    print(f"\nsummary: suite={s.name}, {total:.0f} s"
          + (f" (goal < {CPU_BUDGET_SECONDS} s on 2 cores)" if s.name == "cpu" else ""))
    for key, (title, _) in parts.items():
        print(f"  {title}: {s.results[key]['summary']}")
    print(f"results: {s.out / 'results.json'}")
