"""The benchmark's own command-line keys: `suite=NAME` and `bench.KEY=VALUE`.

They are not part of the run schema (a training run has no use for them), so
they are taken out of the command line here and everything else goes to Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import get_type_hints

SUITES = ("cpu", "gpu", "speedrun")


@dataclass
class BenchOptions:
    steps: int = field(default=20, metadata={"help": "timed optimizer steps (benchmark mode, GPU suite)"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (allocator, compile, caches)"})
    synthetic: bool = field(default=False, metadata={"help": "benchmark mode: random tokens, no corpus "
                                                      "(the suites choose per part)"})
    vocab: int = field(default=13563, metadata={"help": "synthetic vocabulary (the default corpus' size)"})
    pairs: int = field(default=30, metadata={"help": "A/B block pairs per paired comparison"})
    block_seconds: float = field(default=1.0, metadata={"help": "minimum length of one timed block"})
    startup_pairs: int = field(default=4, metadata={"help": "launch pairs for the start-up comparison"})
    parts: str = field(default="all", metadata={"help": "suite=cpu parts, comma-separated: "
                                                "engine,data,startup,scaling,precision"})
    out: str = field(default="", metadata={"help": "suite output folder; empty: outputs/bench/DATE/TIME"})
    engine_model: str = field(default="tiny", metadata={"help": "suite=cpu engine overhead: the model preset "
                                                        "(tiny: the shortest steps, where overhead shows most)"})
    # suite=speedrun
    contenders: str = field(default="all", metadata={"help": "suite=speedrun contenders, comma-separated: "
                                                      "baseline,muon,rotary,qk_norm,relu2,vocab64,"
                                                      "zero_init_proj,combined (the baseline always runs)"})
    max_steps: int = field(default=200, metadata={"help": "suite=speedrun: step budget per contender (the "
                                                  "schedule's length, the same for all)"})
    eval_every: int = field(default=20, metadata={"help": "suite=speedrun: steps between val-loss evals "
                                                  "(off the training clock)"})
    eval_windows: int = field(default=64, metadata={"help": "suite=speedrun: val windows per eval, the first "
                                                    "non-overlapping ones of the val split"})
    target: float = field(default=0.0, metadata={"help": "suite=speedrun: val loss to reach; 0: the "
                                                 "baseline's final val loss"})


class OptionError(ValueError):
    """A `suite=` or `bench.*` argument that cannot be used; names the key."""


def _convert(key: str, raw: str, kind: type):
    if kind is bool:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise OptionError(f"bench.{key}={raw!r}: give true or false")
    try:
        value = kind(raw)
    except ValueError:
        raise OptionError(f"bench.{key}={raw!r}: not a valid {kind.__name__}") from None
    if kind in (int, float):
        least = 0 if key == "warmup" else 1e-9  # warm-up may be skipped; counts and times may not be zero
        if value < least:
            raise OptionError(f"bench.{key}={raw!r} must be {'>= 0' if key == 'warmup' else '> 0'}")
    return value


def parse_args(args: list[str]) -> tuple[str | None, BenchOptions, list[str]]:
    """(suite or None, bench options, the remaining Hydra overrides)."""
    kinds = get_type_hints(BenchOptions)
    suite, values, rest = None, {}, []
    for arg in args:
        key, sep, raw = arg.partition("=")
        if key == "suite" and sep:
            if raw not in SUITES:
                raise OptionError(f"suite={raw!r} is not a suite; choose one of: {', '.join(SUITES)}")
            suite = raw
        elif key.startswith("bench.") and sep:
            name = key[len("bench."):]
            if name not in kinds:
                raise OptionError(f"{key} is not a benchmark key; valid keys: "
                                  f"{', '.join('bench.' + k for k in kinds)}")
            values[name] = _convert(name, raw, kinds[name])
        else:
            rest.append(arg)
    return suite, BenchOptions(**values), rest


def usage() -> str:
    width = max(len(f.name) for f in fields(BenchOptions)) + 6
    def shown(v):
        return str(v).lower() if isinstance(v, bool) else repr(v)

    keys = "\n".join(f"  bench.{f.name:<{width - 6}}  {f.metadata['help']} (default {shown(f.default)})"
                     for f in fields(BenchOptions))
    return f"""usage: python -m lingmao.bench [suite=cpu|gpu|speedrun] [bench.KEY=VALUE ...] [lingmao overrides ...]

Without suite=: benchmark mode. A short warm-up, then timed steps of the composed
run (hardware=X model=Y ..., any lingmao override): samples/sec, tokens/sec, MFU,
step-time split, peak memory; printed and logged to MLflow (experiment lingmao-bench).

suite=cpu  engine overhead, data wait, start-up, scaling, CPU precision (< 5 min on 2 cores)
suite=gpu  MFU of small/medium/large with bf16, compile, fused AdamW, flash SDPA; fp16 +
           GradScaler; medium at context 512 against seed 000's RTX 4090 row (needs CUDA)
suite=speedrun  time to a target val loss of optim=muon and each model switch (alone and
           together) against the baseline as given: steps, train seconds, ratios, plot

benchmark keys:
{keys}"""
