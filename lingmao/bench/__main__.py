"""`python -m lingmao.bench hardware=X model=Y [suite=cpu|gpu|speedrun] [bench.KEY=VALUE ...] [overrides ...]`."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from lingmao.bench.options import OptionError, parse_args, usage
from lingmao.config import ConfigError
from lingmao.data.corpus import CorpusError

USER_ERRORS = (OptionError, ConfigError, CorpusError, HydraException, OmegaConfBaseException)
EXPERIMENT = "lingmao-bench"


def open_tracker(cfg, plan, suite: str | None, opts):
    from lingmao.tracking.provenance import git_state, launch_host
    from lingmao.tracking.store import resolve_uri
    from lingmao.tracking.tracker import Tracker
    from lingmao.train.job import cfg_dict

    launch = Path.cwd()
    name = f"{suite + '-suite' if suite else 'bench'}-{plan.preset}-{cfg.model.name}"
    tracker = Tracker(resolve_uri(cfg.tracking.uri, launch), EXPERIMENT, name, enabled=cfg.tracking.enabled)
    tracker.set_tags(
        {
            "hardware": plan.preset,
            "model": cfg.model.name,
            "suite": suite or "",
            "host": launch_host(),
            **git_state(launch),
        }
    )
    tracker.log_params({"config": cfg_dict(cfg), "plan": plan.as_dict(), "bench": asdict(opts)})
    return tracker


def benchmark_mode(cfg, plan, opts, tracker) -> None:
    from lingmao.bench.measure import benchmark, train_tokens

    windows = (opts.warmup + 2 * opts.steps + 2) * plan.effective_batch
    tokens, vocab, stride, source = train_tokens(
        cfg, opts.synthetic, opts.vocab, windows, progress=cfg.trainer.progress
    )
    peak = plan.peak_tflops_per_device if plan.device != "cpu" else None
    peaks = {f"the {plan.preset} preset's peak": peak} if peak else {}
    print(
        f"lingmao bench: hardware={plan.preset} model={cfg.model.name} | {plan.device} {plan.precision}"
        f"{' compiled' if plan.compile else ' eager'} | micro-batch {plan.micro_batch} x accumulation "
        f"{plan.accumulation}, context {cfg.model.context_length} | {source}"
    )
    result = benchmark(
        cfg,
        plan,
        tokens,
        vocab,
        stride,
        steps=opts.steps,
        warmup=opts.warmup,
        tracker=tracker,
        peaks=peaks,
        label=f"{plan.preset}-{cfg.model.name}",
    )
    print(
        f"{result.params / 1e6:.2f}M params | {opts.steps} timed steps in {result.seconds:.1f} s "
        f"after {opts.warmup} warm-up steps"
    )
    print("\n".join(result.lines()))
    tracker.log_metrics(result.metrics("bench/"), opts.warmup + opts.steps)
    tracker.log_dict(asdict(result), "bench.json")


def suite_parts(name: str, plan, opts) -> dict:
    """{key: (title, function)} of the parts to run; refuses before any work
    a suite that does not fit the plan or a part that does not exist."""
    if name == "gpu":
        from lingmao.bench.gpu import gpu_suite

        return {"gpu": ("GPU", gpu_suite)}
    if name == "speedrun":
        from lingmao.bench.speedrun import chosen, speedrun

        chosen(opts.contenders)  # a bad name is refused before any work
        return {"speedrun": ("6. time to quality (speedrun)", speedrun)}
    from lingmao.bench.cpu import CPU_PARTS

    if plan.device != "cpu":
        raise OptionError(
            f"suite=cpu measures the CPU, but hardware={plan.preset} runs on {plan.device}: add hardware=cpu"
        )
    if opts.parts == "all":
        return dict(CPU_PARTS)
    names = [p.strip() for p in opts.parts.split(",") if p.strip()]
    if not names or any(n not in CPU_PARTS for n in names):
        raise OptionError(
            f"bench.parts={opts.parts!r}: choose 'all' or some of {', '.join(CPU_PARTS)}, comma-separated"
        )
    return {n: CPU_PARTS[n] for n in names}


def run(args: list[str]) -> None:
    from lingmao.bench.compose import Composer
    from lingmao.plan.machine import detect
    from lingmao.plan.make import runnable_plan
    from lingmao.train.backend import apply_runtime

    suite, opts, overrides = parse_args(args)
    if suite == "gpu":
        from lingmao.bench.gpu import require_cuda

        require_cuda()
    composer = Composer(overrides)
    cfg = composer.compose()
    machine = detect()
    plan = runnable_plan(cfg, machine)
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr)
    if suite:
        from lingmao.bench.suite import Suite, run_suite

        parts = suite_parts(suite, plan, opts)
    apply_runtime(plan)
    tracker = open_tracker(cfg, plan, suite, opts)
    try:
        if suite:
            run_suite(Suite(suite, composer, cfg, plan, machine, opts, tracker), parts)
        else:
            benchmark_mode(cfg, plan, opts, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    if tracker.enabled:
        print(f"mlflow: {tracker.uri} run {tracker.run_id} (experiment {EXPERIMENT})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(usage())
        return 0
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
