"""suite=cpu: lingmao's speed on a CPU, in under 5 minutes on 2 cores (each
part prints its wall time; the total is checked at the end):

    1 engine     engine/bare tokens/s (paired blocks), and equal losses for 20 steps (overhead.py)
    2 data       share of step time spent waiting for data, model=small
    3 startup    process start -> first optimizer step: lingmao.run vs a bare script
    5 scaling    tokens/s and peak RSS for tiny/small/medium x context 128/512
    7 precision  bf16 autocast + torch.compile vs fp32 eager, model=tiny (paired blocks)
    8 loss       chunked vs whole-batch cross-entropy, model=small (paired blocks)

Every part starts from the composed command line (hardware, data, optim, any
override) and sets only what its question needs, and prints what it set.
Parts 2, 5 and 7 train through the engine's step (loop.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from statistics import median

from lingmao.bench.overhead import engine_overhead
from lingmao.bench.stats import compare, interleave
from lingmao.bench.suite import Suite, silent_tracker

# --- 2. data pipeline ---


def data_pipeline(s: Suite) -> dict:
    """Time in next(loader) over the whole step, with the preset's workers,
    on the prepared corpus (its memory map, as training reads it). Context 128
    and accumulation 1: less compute per fetched batch than the preset's 512,
    so the share is if anything overstated."""
    from lingmao.bench.measure import benchmark, train_tokens

    cfg, plan = s.variant("small", **{"model.context_length": 128, "hardware.accumulation": 1})
    tokens, vocab, stride, source = train_tokens(cfg, False, s.opts.vocab, 0)
    r = benchmark(cfg, plan, tokens, vocab, stride, steps=3, warmup=1, tracker=silent_tracker(), matmul=False)
    step = sum(r.split.values())
    ok = r.data_share < 0.02
    print(
        f"data wait {r.split['data'] * 1e3:.2f} ms of a {step * 1e3:,.0f} ms step = {r.data_share:.3%} "
        f"(goal < 2%: {'met' if ok else 'MISSED'}) | {plan.num_workers} workers, micro-batch "
        f"{plan.micro_batch}, context 128, {plan.precision} | {source}"
    )
    return {
        "summary": f"data wait {r.data_share:.3%} of step time (goal < 2%: {'met' if ok else 'MISSED'})",
        "data_wait_share": r.data_share,
        "data_wait_seconds": r.split["data"],
        "step_seconds": step,
        "goal_met": ok,
        "num_workers": plan.num_workers,
    }


# --- 3. start-up ---


def startup_launcher(s: Suite, cfg, plan, work: Path):
    """(timed, marks): timed(mode) launches lingmao.run ("run") or the bare
    script ("bare") once, model=tiny, and returns its seconds from process
    start to first optimizer step; marks[mode] collects each launch's marks."""
    import lingmao
    from lingmao.bench.startup import bare_spec, launch
    from lingmao.data import load_corpus

    data = load_corpus(cfg.data)
    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(lingmao.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    runs = {"n": 0}

    def run_args() -> list[str]:
        runs["n"] += 1
        return [
            *s.composer.with_groups({"model": "tiny"}),
            "trainer.max_steps=1",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"hydra.run.dir={work / 'runs' / str(runs['n'])}",
        ]

    spec = bare_spec(cfg, plan, data)
    marks = {"run": [], "bare": []}

    def timed(mode: str) -> float:
        m = launch(mode, run_args() if mode == "run" else spec, Path.cwd(), env, work)
        marks[mode].append(m)
        return m["step"] - m["launch"]

    return timed, marks


def startup(s: Suite) -> dict:
    """model=tiny as the quick start trains it (the preset's batch and
    accumulation), warm cache: the corpus is prepared, this process has read
    every library both launchers import (so the page cache holds them), and
    the scratch MLflow store in the output folder exists."""
    from lingmao.bench.startup import BARE_PHASES, RUN_PHASES, median_phases
    from lingmao.tracking.store import ensure_store

    cfg, plan = s.variant("tiny")
    work = s.out / "startup"
    timed, marks = startup_launcher(s, cfg, plan, work)
    ensure_store(f"sqlite:///{work / 'mlflow.db'}")  # as a user's second run finds it
    paired = interleave(lambda: timed("run"), lambda: timed("bare"), s.opts.startup_pairs)
    verdict = compare(paired)
    run_s, bare_s = median(paired.a), median(paired.b)
    print(
        f"process start -> first optimizer step (median of {len(paired.a)}): lingmao.run {run_s:.2f} s, "
        f"bare script {bare_s:.2f} s | model=tiny, micro-batch {plan.micro_batch} x {plan.accumulation}, "
        f"{plan.precision}"
    )
    print(verdict.describe("lingmao.run/bare start-up"))
    run_phases, bare_phases = median_phases(marks["run"], RUN_PHASES), median_phases(marks["bare"], BARE_PHASES)
    for name, spans in (("lingmao.run", run_phases), ("bare script", bare_phases)):
        print(f"  {name}, median per phase:")
        for _, label, seconds in spans:
            print(f"    {seconds:7.3f} s  {label}")
    ok = run_s <= 5.0 and verdict.conclusive and verdict.ratio.median <= 1.25
    ratio = f"{verdict.ratio.median:.2f}x bare" if verdict.conclusive else "ratio inconclusive"
    return {
        "summary": f"start-up {run_s:.2f} s, {ratio} (goal <= 5 s and <= 1.25x: {'met' if ok else 'MISSED'})",
        "run_seconds": run_s,
        "bare_seconds": bare_s,
        "ratio": verdict.ratio.median,
        "ratio_low": verdict.ratio.low,
        "ratio_high": verdict.ratio.high,
        "control": verdict.control.median,
        "conclusive": verdict.conclusive,
        "goal_met": ok,
        "run_phases": {key.replace(":", "_"): seconds for key, _, seconds in run_phases},
        "bare_phases": {key: seconds for key, _, seconds in bare_phases},
    }


# --- 5. scaling ---

SCALING_MODELS = ("tiny", "small", "medium")
SCALING_CONTEXTS = (128, 512)
SCALING_TOKENS = 256  # tokens per step in every row but context 512's (micro-batch 256 / context, at least 1)


def scaling(s: Suite) -> dict:
    """A few steps per (model, context) on synthetic tokens at the plan's
    precision; the same number of tokens per step in every row, so rows differ
    only in model and context."""
    from lingmao.bench.measure import benchmark, train_tokens

    rows = []
    for model in SCALING_MODELS:
        for ctx in SCALING_CONTEXTS:
            batch = max(1, SCALING_TOKENS // ctx)
            cfg, plan = s.variant(
                model, **{"model.context_length": ctx, "hardware.batch": batch, "hardware.accumulation": 1}
            )
            tokens, vocab, stride, _ = train_tokens(cfg, True, s.opts.vocab, 8 * batch)
            r = benchmark(cfg, plan, tokens, vocab, stride, steps=2, warmup=1, tracker=silent_tracker(), matmul=False)
            rows.append(
                {
                    "model": model,
                    "params": r.params,
                    "context_length": ctx,
                    "micro_batch": batch,
                    "precision": plan.precision,
                    "tokens_per_sec": r.tokens_per_sec,
                    "step_seconds": sum(r.split.values()),
                    "peak_memory_gb": r.peak_memory_bytes / 2**30,
                    "training_memory_gb": (r.peak_memory_bytes - r.base_memory_bytes) / 2**30,
                    "memory": r.memory_kind,
                }
            )
            print(
                f"  {model:<7} {r.params / 1e6:7.1f}M  ctx {ctx:4d}  batch {batch:2d}  "
                f"{r.tokens_per_sec:9,.0f} tokens/s  {rows[-1]['peak_memory_gb']:6.2f} GiB {r.memory_kind} "
                f"({rows[-1]['training_memory_gb']:.2f} GiB of it for this model)"
            )
    (s.out / "scaling.json").write_text(json.dumps(rows, indent=2))
    png = plot_scaling(rows, s.out / "scaling.png")
    s.tracker.log_artifact(png)
    s.tracker.log_artifact(s.out / "scaling.json")
    table = {
        f"{r['model']}_ctx{r['context_length']}": {
            k: r[k] for k in ("params", "tokens_per_sec", "peak_memory_gb", "training_memory_gb")
        }
        for r in rows
    }
    return {"summary": f"{len(rows)} rows: table above, {png}", "table": table}


def plot_scaling(rows: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))  # no pyplot: no backend or global figure state
    speed, memory = fig.subplots(1, 2)
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
    fig.suptitle(
        f"lingmao training on CPU ({rows[0]['precision']}), micro-batch {SCALING_TOKENS} / context (at least 1)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --- 7. CPU precision ---


def cpu_precision(s: Suite) -> dict:
    """bf16 autocast + torch.compile against fp32 eager on what a CPU user
    trains: model=tiny (the quick start's) at the preset's micro-batch,
    accumulation 1 so that a step stays well under a block. Its largest matmul,
    the output head (tokens x d_model x vocabulary), is where bf16 would pay.
    Both train through the engine's step."""
    from lingmao.bench.loop import Steps
    from lingmao.bench.measure import train_tokens
    from lingmao.data.windows import TokenWindows

    shape = {"hardware.accumulation": 1}
    cfg32, plan32 = s.variant("tiny", **shape, **{"hardware.precision": "fp32", "hardware.compile": False})
    cfg16, plan16 = s.variant("tiny", **shape, **{"hardware.precision": "bf16", "hardware.compile": True})
    tokens, vocab, stride, _ = train_tokens(cfg32, True, s.opts.vocab, 4096)
    windows = TokenWindows(tokens, cfg32.model.context_length, stride)
    fp32 = Steps(cfg32, plan32, windows, vocab, total_steps=cfg32.trainer.max_steps)
    bf16 = Steps(cfg16, plan16, windows, vocab, total_steps=cfg16.trainer.max_steps)
    start = time.perf_counter()
    bf16.step()
    compile_s = time.perf_counter() - start
    bf16.run_for(s.opts.block_seconds)
    fp32.run_for(s.opts.block_seconds)
    paired = interleave(
        lambda: bf16.run_for(s.opts.block_seconds), lambda: fp32.run_for(s.opts.block_seconds), s.opts.pairs
    )
    verdict = compare(paired)
    native = s.machine.native_bf16_cpu
    print(verdict.describe("bf16+compile / fp32 eager tokens/s"))
    print(
        f"median tokens/s: bf16+compile {median(paired.a):,.0f}, fp32 eager {median(paired.b):,.0f} | model=tiny, "
        f"micro-batch {plan32.micro_batch}, context {cfg32.model.context_length} | "
        f"first compiled step {compile_s:.1f} s (with a cold inductor cache that is mostly C++ compilation; "
        f"later runs reuse the kernels) | native bf16 (AMX/AVX512-BF16): {'yes' if native else 'no'}"
    )
    ok = verdict.conclusive and verdict.ratio.median >= 2.0
    goal = f"goal >= 2x: {'met' if ok else 'MISSED'}" if native else "no native bf16 here: the 2x goal does not apply"
    ratio = f"{verdict.ratio.median:.2f}x" if verdict.conclusive else "inconclusive"
    return {
        "summary": f"bf16+compile / fp32 eager {ratio} ({goal})",
        "ratio": verdict.ratio.median,
        "ratio_low": verdict.ratio.low,
        "ratio_high": verdict.ratio.high,
        "control": verdict.control.median,
        "conclusive": verdict.conclusive,
        "compile_seconds": compile_s,
        "native_bf16": native,
        "bf16_tokens_per_sec": median(paired.a),
        "fp32_tokens_per_sec": median(paired.b),
    }


# --- 8. chunked loss ---


def chunked_loss(s: Suite) -> dict:
    """The plan's chunked cross-entropy (LOSS_CHUNK tokens of logits at a
    time, recomputed in backward) against the whole micro-batch's logits at
    once: model=small at the preset's micro-batch 8 x context 512 (4096 tokens,
    4 chunks), accumulation 1, fp32 eager; tokens/s in paired blocks, and the
    estimate's logits memory for both."""
    from dataclasses import replace

    from lingmao.bench.loop import Steps
    from lingmao.bench.measure import train_tokens
    from lingmao.data.windows import TokenWindows
    from lingmao.plan.estimate import model_shape
    from lingmao.plan.memory import estimate_memory

    cfg, plan = s.variant(
        "small", **{"hardware.accumulation": 1, "hardware.precision": "fp32", "hardware.compile": False}
    )
    whole = replace(plan, loss_chunk=0)
    tokens, vocab, stride, _ = train_tokens(cfg, True, s.opts.vocab, 4096)
    windows = TokenWindows(tokens, cfg.model.context_length, stride)
    chunked, full = (Steps(cfg, p, windows, vocab, total_steps=cfg.trainer.max_steps) for p in (plan, whole))
    chunked.run_for(s.opts.block_seconds)
    full.run_for(s.opts.block_seconds)
    paired = interleave(
        lambda: chunked.run_for(s.opts.block_seconds), lambda: full.run_for(s.opts.block_seconds), s.opts.pairs
    )
    verdict = compare(paired)
    shape = model_shape(cfg.model, vocab=vocab, precision="fp32", device="cpu", ddp=False)
    gb = {
        k: estimate_memory(micro_batch=plan.micro_batch, **{**shape, "loss_chunk": c}).logits / 2**30
        for k, c in (("chunked", plan.loss_chunk), ("full", 0))
    }
    print(verdict.describe("chunked / whole-batch loss tokens/s"))
    print(
        f"logits memory (estimate): chunked {gb['chunked']:.2f} GB, whole batch {gb['full']:.2f} GB | "
        f"model=small, micro-batch {plan.micro_batch}, context {cfg.model.context_length}, chunk {plan.loss_chunk}"
    )
    ratio = f"{verdict.ratio.median:.3f}x" if verdict.conclusive else "inconclusive"
    logits = f"logits {gb['chunked']:.2f} vs {gb['full']:.2f} GB"
    return {
        "summary": f"chunked / whole-batch loss tokens/s {ratio}; {logits}",
        "ratio": verdict.ratio.median,
        "ratio_low": verdict.ratio.low,
        "ratio_high": verdict.ratio.high,
        "control": verdict.control.median,
        "conclusive": verdict.conclusive,
        "logits_gb_chunked": gb["chunked"],
        "logits_gb_full": gb["full"],
    }


CPU_PARTS = {
    "engine": ("1. engine overhead", engine_overhead),
    "data": ("2. data pipeline", data_pipeline),
    "startup": ("3. start-up", startup),
    "scaling": ("5. scaling", scaling),
    "precision": ("7. CPU precision", cpu_precision),
    "loss": ("8. chunked loss", chunked_loss),
}
