"""suite=speedrun: time to quality.

How much sooner does each speedrun switch reach a target validation loss
than the AdamW baseline of the same engine? Each contender is the composed
command line with one switch turned on (optim=muon, model.rotary, ...), or
all of them together. Every contender trains through the engine's own step
(lingmao/bench/loop.py: its model, optimizer, schedule, batches and
finiteness check) from the same seed, on the same data order, under the same
`bench.max_steps` budget, so the warmup + cosine schedule is the same for all. Every
`bench.eval_every` steps the training clock stops, the val loss is taken over
a fixed set of validation windows, and the clock restarts. A contender stops
at its first eval at or below the target.

The target is `bench.target`, or by default the baseline's final val loss:
the baseline runs its whole budget first, its ratio is 1.0 by construction,
and every other contender races to what the baseline ends with.

Steps to target are deterministic given the seed (the same on any machine
with the same kernels); seconds depend on the machine and whatever else runs
on it, so both are reported.
"""

from __future__ import annotations

import gc
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from omegaconf import OmegaConf

from lingmao.bench.options import OptionError

# name -> (group choices, values, what it sets); each on top of the command line.
SWITCHES = {
    "muon": ({"optim": "muon"}, {}, "optim=muon"),
    "rotary": ({}, {"model.rotary": True}, "model.rotary=true"),
    "qk_norm": ({}, {"model.qk_norm": True}, "model.qk_norm=true"),
    "relu2": ({}, {"model.mlp": "relu2"}, "model.mlp=relu2"),
    "vocab64": ({}, {"model.vocab_multiple": 64}, "model.vocab_multiple=64"),
    "zero_init_proj": ({}, {"model.zero_init_proj": True}, "model.zero_init_proj=true"),
}
CONTENDERS = {
    "baseline": ({}, {}, "the command line as given"),
    **SWITCHES,
    "combined": (
        {k: v for g, _, _ in SWITCHES.values() for k, v in g.items()},
        {k: v for _, vs, _ in SWITCHES.values() for k, v in vs.items()},
        "every switch above",
    ),
}


def chosen(spec: str) -> list[str]:
    """The contenders `bench.contenders` names, in CONTENDERS order, the
    baseline always first (every ratio is against it)."""
    if spec == "all":
        return list(CONTENDERS)
    names = {n.strip() for n in spec.split(",") if n.strip()}
    bad = sorted(names - set(CONTENDERS))
    if not names or bad:
        raise OptionError(
            f"bench.contenders={spec!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
            f"choose 'all' or some of {', '.join(CONTENDERS)}, comma-separated "
            f"(the baseline always runs)"
        )
    return ["baseline"] + [n for n in CONTENDERS if n in names and n != "baseline"]


# --- one contender ---


@dataclass(frozen=True)
class Eval:
    step: int
    seconds: float  # training seconds before this eval (evals themselves excluded)
    val_loss: float


@dataclass
class Contender:
    name: str
    setting: str
    params: int
    evals: list[Eval] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    stopped: str = "budget"  # budget | target | diverged

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def best(self) -> Eval:
        return min(self.evals, key=lambda e: e.val_loss)


def fixed_val_batches(val_tokens, context_length: int, micro_batch: int, wanted: int):
    """The first `wanted` non-overlapping validation windows (fewer if the
    split is shorter), in micro-batches: one fixed set for every contender."""
    from lingmao.data.windows import TokenWindows

    windows = TokenWindows(val_tokens, context_length, context_length)
    n = min(wanted, len(windows))
    return [windows[list(range(i, min(i + micro_batch, n)))] for i in range(0, n, micro_batch)], n


def race(
    c: Contender, loop, val_batches, n_windows: int, max_steps: int, eval_every: int, target: float | None, tracker
) -> Contender:
    """Train `loop` to max_steps (or the target), timing each step and
    evaluating every `eval_every` steps off the clock."""
    from lingmao.train.distributed import Dist
    from lingmao.train.validation import evaluate

    def run_eval() -> bool:
        start = time.perf_counter()
        # The engine's own evaluate: its loss definition, autocast, eval mode and back.
        val = evaluate(loop.raw, val_batches, loop.plan, loop.device, len(val_batches), Dist(), n_windows)
        c.eval_seconds += time.perf_counter() - start
        c.evals.append(Eval(loop.steps, c.train_seconds, val))
        tracker.log_metrics(
            {f"speedrun/{c.name}/val_loss": val, f"speedrun/{c.name}/train_seconds": c.train_seconds}, loop.steps
        )
        print(f"  step {loop.steps:5d}  {c.train_seconds:9.2f} s  val loss {val:.4f}", flush=True)
        return target is not None and val <= target

    if run_eval():
        c.stopped = "target"
        return c
    while loop.steps < max_steps:
        start = time.perf_counter()
        loss = loop.step().item()  # .item(): on CUDA the step's kernels finish inside its time
        c.step_seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            c.stopped = "diverged"
            print(f"  step {loop.steps:5d}  training loss {loss}: diverged, stopped")
            break
        if (loop.steps % eval_every == 0 or loop.steps == max_steps) and run_eval():
            c.stopped = "target"
            break
    return c


# --- the suite part ---


def race_data(s):
    """(corpus, train windows, the fixed val batches, how many val windows
    they hold) of the composed command line, with what was loaded printed."""
    from lingmao.data import load_corpus
    from lingmao.data.windows import TokenWindows, default_stride

    o, cfg = s.opts, s.cfg
    t = time.perf_counter()
    data = load_corpus(cfg.data, progress=cfg.trainer.progress)
    ctx = cfg.model.context_length
    train = TokenWindows(data.tokens("train"), ctx, default_stride(cfg.data.stride, ctx))
    val_batches, n_val = fixed_val_batches(data.tokens("val"), ctx, s.plan.micro_batch, o.eval_windows)
    print(
        f"corpus ready in {time.perf_counter() - t:.1f} s | {len(train):,} train windows | val loss over the "
        f"first {n_val} non-overlapping val windows (bench.eval_windows={o.eval_windows}) | "
        f"{o.max_steps} steps, eval every {o.eval_every}"
    )
    if n_val < o.eval_windows:
        print(f"note: the val split has only {n_val} windows of context {ctx}")
    return data, train, val_batches, n_val


def run_contender(
    s, name: str, train, vocab_size: int, val_batches, n_val: int, target: float | None, baseline_config: dict
) -> Contender:
    """Build contender `name` through the engine's step and race it; its
    model and optimizer are freed before the next contender is built."""
    from lingmao.bench.loop import Steps

    o = s.opts
    groups, values, setting = CONTENDERS[name]
    cfg, plan = s.variant(groups=groups, **values)
    if name != "baseline" and OmegaConf.to_container(cfg, resolve=True) == baseline_config:
        print(
            f"note: {name} is the baseline's very config (the command line already sets {setting}): "
            f"its seconds ratio shows run-to-run noise"
        )
    loop = Steps(cfg, plan, train, vocab_size, total_steps=o.max_steps)
    c = Contender(name, setting, loop.raw.num_params())
    print(f"{name} ({setting}): {c.params / 1e6:.2f}M params, optim={cfg.optim.name}", flush=True)
    race(c, loop, val_batches, n_val, o.max_steps, o.eval_every, target, s.tracker)
    del loop
    gc.collect()
    return c


def baseline_target(baseline: Contender) -> float:
    """The baseline's final val loss: the target when bench.target is not given."""
    if baseline.stopped == "diverged":
        raise OptionError(
            f"the baseline diverged at step {len(baseline.step_seconds)}: "
            f"its final val loss is no target; lower optim.lr or give bench.target"
        )
    target = baseline.evals[-1].val_loss
    print(f"target: the baseline's final val loss, {target:.4f}")
    return target


def speedrun(s) -> dict:
    o = s.opts
    names = chosen(o.contenders)
    data, train, val_batches, n_val = race_data(s)
    target = o.target or None
    baseline_config = OmegaConf.to_container(s.cfg, resolve=True)
    runs: list[Contender] = []
    for name in names:
        runs.append(run_contender(s, name, train, data.vocab_size, val_batches, n_val, target, baseline_config))
        if name == "baseline" and target is None:
            target = baseline_target(runs[-1])
    return report(s, runs, target, names, n_val)


def report(s, runs: list[Contender], target: float, names: list[str], n_val: int) -> dict:
    """Print the table, plot the curves, and return the part's results."""
    o = s.opts
    rows = summarise(runs, target)
    print()
    print("\n".join(table(rows, target, bool(o.target))))
    print(
        "steps to target are deterministic given the seed; seconds are this machine's, at this load "
        "(contenders run one after another, so a busy neighbour shifts their ratios)"
    )
    png = plot_speedrun(runs, target, s.out / "speedrun.png")
    s.tracker.log_artifact(png)
    command = reproduce_command(s.composer.overrides, o, names)
    print(f"plot: {png}\nreproduce: {command}")
    reached = {
        r["name"]: (
            f"{r['ratio_seconds']:.2f}x"
            if r["ratio_seconds"] is not None
            else "reached"
            if r["reached"]
            else "not reached"
        )
        for r in rows
        if r["name"] != "baseline"
    }
    summary = f"target val loss {target:.4f} ({'bench.target' if o.target else 'baseline final'}); " + (
        "seconds vs baseline: " + ", ".join(f"{k} {v}" for k, v in reached.items()) if reached else "the baseline alone"
    )
    return {
        "summary": summary,
        "target": target,
        "target_source": "bench.target" if o.target else "baseline final val loss",
        "max_steps": o.max_steps,
        "eval_every": o.eval_every,
        "eval_windows": n_val,
        "command": command,
        "plot": str(png),
        "contenders": {r["name"]: r for r in rows},
    }


def summarise(runs: list[Contender], target: float) -> list[dict]:
    """Per contender: time and steps to target, and their ratios to the baseline's (runs[0])."""
    rows = []
    for c in runs:
        hit = next((e for e in c.evals if e.val_loss <= target), None)  # the first at or below
        best = c.best
        rows.append(
            {
                "name": c.name,
                "setting": c.setting,
                "params": c.params,
                "reached": hit is not None,
                "steps_to_target": hit.step if hit else None,
                "seconds_to_target": hit.seconds if hit else None,
                "best_val_loss": best.val_loss,
                "best_step": best.step,
                "last_val_loss": c.evals[-1].val_loss,
                "last_step": c.evals[-1].step,
                "steps": len(c.step_seconds),
                "train_seconds": c.train_seconds,
                "median_step_seconds": median(c.step_seconds) if c.step_seconds else None,
                "eval_seconds": c.eval_seconds,
                "stopped": c.stopped,
                "history": [[e.step, e.seconds, e.val_loss] for e in c.evals],
            }
        )
    base = rows[0]
    for r in rows:
        for key, of in (("ratio_seconds", "seconds_to_target"), ("ratio_steps", "steps_to_target")):
            ok = r["reached"] and base["reached"] and base[of] > 0
            r[key] = r[of] / base[of] if ok else None
    return rows


def table(rows: list[dict], target: float, given: bool) -> list[str]:
    head = [
        "contender",
        "params",
        "steps to target",
        "seconds to target",
        "x baseline (s)",
        "x baseline (steps)",
        "best val @ step",
        "s/step (median)",
        "eval share",
    ]

    def cells(r: dict) -> list[str]:
        if r["reached"]:
            to = [str(r["steps_to_target"]), f"{r['seconds_to_target']:.2f}"]
        else:
            to = [
                f"not reached (best {r['best_val_loss']:.4f} at step {r['best_step']})"
                + (", diverged" if r["stopped"] == "diverged" else ""),
                "-",
            ]
        ratios = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("ratio_seconds", "ratio_steps")]
        step_s = f"{r['median_step_seconds']:.3f}" if r["median_step_seconds"] is not None else "-"
        share = f"{r['eval_seconds'] / r['train_seconds']:.1%}" if r["train_seconds"] else "-"
        return [
            r["name"],
            f"{r['params'] / 1e6:.2f}M",
            *to,
            *ratios,
            f"{r['best_val_loss']:.4f} @ {r['best_step']}",
            step_s,
            share,
        ]

    grid = [head] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(head))]
    lines = [
        f"target val loss {target:.4f} ({'bench.target' if given else 'the baseline final val loss'}); "
        f"x baseline < 1: sooner than the baseline; eval share: eval time / train time"
    ]
    for i, row in enumerate(grid):
        lines.append("  ".join(c.ljust(w) if j < 1 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def plot_speedrun(runs: list[Contender], target: float, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    by_time, by_step = fig.subplots(1, 2, sharey=True)
    for c in runs:
        style = "o-" if c.name == "baseline" else ".-"
        by_time.plot([e.seconds for e in c.evals], [e.val_loss for e in c.evals], style, label=c.name)
        by_step.plot([e.step for e in c.evals], [e.val_loss for e in c.evals], style, label=c.name)
    for ax, xlabel in ((by_time, "training seconds (evals excluded)"), (by_step, "optimizer steps")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    by_time.set_ylabel("val loss")
    by_step.legend(fontsize=8)
    fig.suptitle(f"time to val loss {target:.3f} (dashed): lingmao speedrun switches against the baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def reproduce_command(overrides: list[str], o, names: list[str]) -> str:
    keys = [
        f"bench.max_steps={o.max_steps}",
        f"bench.eval_every={o.eval_every}",
        f"bench.eval_windows={o.eval_windows}",
        f"bench.contenders={'all' if names == list(CONTENDERS) else ','.join(names)}",
    ]
    if o.target:
        keys.append(f"bench.target={o.target}")
    return shlex.join(["python", "-m", "lingmao.bench", "suite=speedrun", *keys, *overrides])
