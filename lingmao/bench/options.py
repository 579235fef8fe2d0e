"""The benchmark's own command-line keys: `suite=NAME` and `bench.KEY=VALUE`.

They are not part of the run schema (a training run has no use for them), so
they are taken out of the command line here, typed by OmegaConf against the
dataclasses below, and everything else goes to Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class SuiteName(Enum):
    cpu = "cpu"
    gpu = "gpu"
    speedrun = "speedrun"


@dataclass
class BenchOptions:
    steps: int = field(default=20, metadata={"help": "timed optimizer steps (benchmark mode, GPU suite)"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (allocator, compile, caches)"})
    synthetic: bool = field(
        default=False, metadata={"help": "benchmark mode: random tokens, no corpus (the suites choose per part)"}
    )
    vocab: int = field(default=13563, metadata={"help": "synthetic vocabulary (the default corpus' size)"})
    pairs: int = field(default=30, metadata={"help": "A/B block pairs per paired comparison"})
    block_seconds: float = field(default=1.0, metadata={"help": "minimum length of one timed block"})
    startup_pairs: int = field(default=4, metadata={"help": "launch pairs for the start-up comparison"})
    parts: str = field(
        default="all", metadata={"help": "suite=cpu parts, comma-separated: engine,data,startup,scaling,precision,loss"}
    )
    out: str | None = field(default=None, metadata={"help": "suite output folder; unset: outputs/bench/DATE/TIME"})
    engine_model: str = field(
        default="tiny",
        metadata={
            "help": "suite=cpu engine overhead: the model preset (tiny: the shortest steps, where overhead shows most)"
        },
    )
    # suite=speedrun
    contenders: str = field(
        default="all",
        metadata={
            "help": "suite=speedrun contenders, comma-separated: "
            "baseline,muon,rotary,qk_norm,relu2,vocab64,"
            "zero_init_proj,combined (the baseline always runs)"
        },
    )
    max_steps: int = field(
        default=200,
        metadata={"help": "suite=speedrun: step budget per contender (the schedule's length, the same for all)"},
    )
    eval_every: int = field(
        default=20, metadata={"help": "suite=speedrun: steps between val-loss evals (off the training clock)"}
    )
    eval_windows: int = field(
        default=64,
        metadata={"help": "suite=speedrun: val windows per eval, the first non-overlapping ones of the val split"},
    )
    target: float = field(
        default=0.0, metadata={"help": "suite=speedrun: val loss to reach; 0: the baseline's final val loss"}
    )


# Counts and times must be positive; these may also be 0 (no warm-up; the baseline's target).
MAY_BE_ZERO = {"warmup", "target"}


@dataclass
class BenchArgs:
    suite: SuiteName | None = None
    bench: BenchOptions = field(default_factory=BenchOptions)


class OptionError(ValueError):
    """A `suite=` or `bench.*` argument that cannot be used; names the key."""


def parse_args(args: list[str]) -> tuple[str | None, BenchOptions, list[str]]:
    """(suite or None, bench options, the remaining Hydra overrides)."""
    ours = [a for a in args if "=" in a and (a.startswith("bench.") or a.partition("=")[0] == "suite")]
    try:
        parsed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchArgs), OmegaConf.from_dotlist(ours)))
    except ConfigKeyError as e:
        raise OptionError(
            f"{e.full_key} is not a benchmark key; valid keys: "
            f"{', '.join('bench.' + f.name for f in fields(BenchOptions))}"
        ) from None
    except OmegaConfBaseException as e:
        raise OptionError(f"{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    opts = parsed.bench
    for f in fields(BenchOptions):
        value = getattr(opts, f.name)
        if f.type in ("int", "float") and (value < 0 if f.name in MAY_BE_ZERO else value <= 0):
            raise OptionError(f"bench.{f.name}={value!r} must be {'>= 0' if f.name in MAY_BE_ZERO else '> 0'}")
    suite = parsed.suite.value if parsed.suite else None
    return suite, opts, [a for a in args if a not in ours]


def usage() -> str:
    width = max(len(f.name) for f in fields(BenchOptions))

    def shown(v):
        return str(v).lower() if isinstance(v, bool) else repr(v)

    keys = "\n".join(
        f"  bench.{f.name:<{width}}  {f.metadata['help']} (default {shown(f.default)})" for f in fields(BenchOptions)
    )
    return f"""usage: python -m lingmao.bench [suite=cpu|gpu|speedrun] [bench.KEY=VALUE ...] [lingmao overrides ...]

Without suite=: benchmark mode. A short warm-up, then timed steps of the composed
run (hardware=X model=Y ..., any lingmao override) through the engine's training
step: samples/sec, tokens/sec, MFU, step-time split, peak memory; printed and
logged to MLflow (experiment lingmao-bench).

suite=cpu  engine overhead, data wait, start-up, scaling, CPU precision (< 5 min on 2 cores)
suite=gpu  MFU of small/medium/large with bf16, compile, fused AdamW, flash SDPA; fp16 +
           GradScaler; medium at context 512 against an RTX 4090 reference row (needs CUDA)
suite=speedrun  time to a target val loss of optim=muon and each model switch (alone and
           together) against the baseline as given: steps, train seconds, ratios, plot

benchmark keys:
{keys}"""
