"""The valid values of every key of a run's config (`RULES`, checked by
`validate`), beyond the types the schema (config/schema.py) holds."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from lingmao.config import ConfigError
from lingmao.config.compose import CONF_DIR, EXPERIMENTS_DIR, option_names
from lingmao.config.keys import LEAVES, optional_type, unknown_keys, valid_keys
from lingmao.config.schema import RunConfig

# -- rules: what each key may be -------------------------------------------------


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any, Any], bool]  # (value, whole config) -> valid?
    valid: Callable[[Any], str]  # whole config -> what is valid, e.g. "must be > 0"
    # What is valid, said to a value that is inf or nan ("must be > 0" reads as if inf passed).
    nonfinite: str = ""


def interval(text: str) -> Rule:
    """A number in an interval written as in mathematics: "[0, 1)", "(0, inf)"."""
    lo_b, lo, hi, hi_b = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", text).groups()
    lo, hi = float(lo), float(hi)

    def ok(v, _):
        return (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and (lo <= v if lo_b == "[" else lo < v)
            and (v <= hi if hi_b == "]" else v < hi)
        )

    if math.isinf(hi):
        bound = f"{'>=' if lo_b == '[' else '>'} {lo:g}"
        words = f"must be {bound}"
        finite = f"must be a number {bound}, or inf" if hi_b == "]" else f"must be a finite number {bound}"
    else:
        words, finite = f"must be in {text}", f"must be a finite number in {text}"
    return Rule(ok, lambda _: words, finite)


POSITIVE, NON_NEGATIVE, FRACTION = interval("(0, inf)"), interval("[0, inf)"), interval("[0, 1)")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v, _: v in choices, lambda _: f"is not valid; choose one of: {', '.join(choices)}")


def matches(pattern: str, what: str) -> Rule:
    return Rule(lambda v, _: isinstance(v, str) and re.fullmatch(pattern, v) is not None, lambda _: f"must be {what}")


TEXT = matches(r"\S(.*\S)?", "non-empty text on one line")
LABEL = matches(r"[\w.-]+", "a name of letters, digits, '_', '.' or '-'")


def _experiment_name_ok(v, cfg) -> bool:
    """Non-empty, on one line, and no path parts: a sqlite store keeps an
    experiment's artifacts in mlartifacts/<name>, so `..` would put them in the
    launch folder. Databricks names experiments by workspace path (/Users/...)."""
    if not TEXT.ok(v, cfg):
        return False
    parts = re.split(r"[/\\]", v)
    uri = str(_get(cfg, "tracking.uri") or "")
    if uri.startswith(("databricks", "uc:")):  # a workspace path: /Users/me/lingmao
        return "\\" not in v and not {".", ".."} & set(parts)
    return len(parts) == 1 and v.strip(".") != ""


EXPERIMENT_NAME = Rule(
    _experiment_name_ok,
    lambda _: "must be non-empty text on one line without path parts ('/', '\\', '.' or '..'), e.g. lingmao-small",
)


def each(rule: Rule, count: int | None = None, min_count: int = 0) -> Rule:
    """A list whose every item passes `rule` (for a dict: every value)."""

    def ok(v, cfg):
        if isinstance(v, (str, int, float)):
            return False
        items = list(v.values()) if isinstance(v, Mapping) else list(v)
        return (
            (count is None or len(items) == count) and len(items) >= min_count and all(rule.ok(x, cfg) for x in items)
        )

    size = f"{count} values" if count else "at least one value" if min_count else "values"
    finite = f"must be {size}, each {rule.nonfinite.removeprefix('must be ')}" if rule.nonfinite else ""
    return Rule(ok, lambda cfg: f"must be {size}, each {rule.valid(cfg).removeprefix('must be ')}", finite)


def _hhmm(v, _) -> bool:
    try:
        dt.datetime.strptime(v, "%H:%M")
        return True
    except (TypeError, ValueError):
        return False


# MLflow's tracking stores (mlflow.tracking._tracking_service.utils registers
# them): a folder path or file:, http(s): for a server, databricks /
# databricks-uc / uc:, and SQLAlchemy's postgresql, mysql, sqlite, mssql, each
# with an optional +driver. Plugins add schemes through entry points.
_DB_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql")
URI_HELP = (
    "a folder path, file:///path, sqlite:///path.db, http(s)://host[:port], databricks[://profile], "
    "databricks-uc, uc:URL, or postgresql|mysql|mssql[+driver]://..."
)


def tracking_uri_ok(uri: Any, _=None) -> bool:
    if not isinstance(uri, str) or not uri.strip():
        return False
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if uri in ("databricks", "databricks-uc") or not m or len(m.group(1)) == 1:  # a path (C:\ on Windows)
        return True
    scheme, rest = m.group(1).lower(), uri[m.end() :]
    if scheme.split("+")[0] in _DB_SCHEMES:
        return scheme.count("+") <= 1 and rest.startswith("//") and (scheme != "sqlite" or len(rest) > 3)
    if scheme in ("http", "https"):
        return re.match(r"//[^/\s]+", rest) is not None
    if scheme in ("file", "databricks", "databricks-uc", "uc"):
        return bool(rest)
    from importlib.metadata import entry_points

    return scheme in {e.name for e in entry_points(group="mlflow.tracking_store")}


def _batch_ok(v, _) -> bool:
    return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def _heads(c) -> tuple[int, int]:
    d, h = _get(c, "model.d_model"), _get(c, "model.n_heads")
    return (d, h) if isinstance(h, int) and h > 0 else (d, 0)


def _experts(c) -> int:
    return _get(c, "model.moe.experts")


def _context(c) -> int:
    return _get(c, "model.context_length")


# Every numeric and string key of the schema, with what it may be; a test
# checks that no key of the schema is missing here. None passes wherever the
# schema makes the key Optional (null: off, or left to the hardware preset).
RULES: dict[str, Rule] = {
    "seed": interval("[0, 4294967295]"),  # numpy's generators take 32-bit seeds
    "resume": TEXT,  # auto | never | a checkpoint file (checked when the run resumes)
    "experiment": one_of(*option_names(EXPERIMENTS_DIR)),
    "night.start": Rule(_hhmm, lambda _: "must be a time as HH:MM, e.g. 21:00"),
    "night.end": Rule(_hhmm, lambda _: "must be a time as HH:MM, e.g. 08:00"),
    "hardware.name": one_of(*option_names(CONF_DIR / "hardware")),
    "hardware.device": one_of("cpu", "cuda", "mps"),
    "hardware.devices": POSITIVE,
    "hardware.memory_gb": NON_NEGATIVE,
    "hardware.peak_tflops": NON_NEGATIVE,
    "hardware.compute_capability": NON_NEGATIVE,
    "hardware.precision": one_of("auto", "bf16", "fp16", "fp32"),
    "hardware.batch": Rule(_batch_ok, lambda _: "must be a positive integer or 'auto'"),
    "hardware.accumulation": POSITIVE,
    "hardware.effective_batch": POSITIVE,
    "hardware.num_workers": NON_NEGATIVE,
    "hardware.prefetch_factor": POSITIVE,
    "hardware.compile": Rule(lambda v, _: isinstance(v, bool) or v == "auto", lambda _: "must be true, false or auto"),
    "hardware.compile_mode": one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "hardware.alloc_conf": matches(r"(\w+:[\w.]+(,\w+:[\w.]+)*)?", "empty or key:value[,key:value...]"),
    "hardware.threads": NON_NEGATIVE,
    "hardware.ddp_backend": one_of("nccl", "gloo"),
    "model.name": LABEL,
    "model.n_heads": POSITIVE,
    "model.d_model": Rule(
        lambda v, c: isinstance(v, int) and v > 0 and v % max(_heads(c)[1], 1) == 0,
        lambda c: f"must be > 0 and divisible by model.n_heads={_heads(c)[1]}",
    ),
    "model.n_layers": POSITIVE,
    "model.context_length": POSITIVE,
    "model.dropout": FRACTION,
    "model.mlp_ratio": POSITIVE,
    "model.moe.experts": NON_NEGATIVE,  # 0: a dense MLP
    "model.moe.top_k": Rule(
        lambda v, c: isinstance(v, int) and v >= 1 and (_experts(c) <= 0 or v <= _experts(c)),
        lambda c: f"must be in 1..model.moe.experts ({_experts(c)})" if _experts(c) > 0 else "must be >= 1",
    ),
    "model.moe.capacity_factor": POSITIVE,
    "model.moe.aux_loss_weight": NON_NEGATIVE,
    "model.rotary": Rule(
        lambda v, c: not v or not _heads(c)[1] or _heads(c)[0] // _heads(c)[1] % 2 == 0,
        lambda c: f"needs an even head size; model.d_model/model.n_heads = {_heads(c)[0] // max(_heads(c)[1], 1)}",
    ),
    "model.mlp": one_of("gelu", "relu2"),  # model.ACTIVATIONS
    "model.vocab_multiple": POSITIVE,  # 1: no padding
    "optim.name": one_of("adamw", "muon"),
    "optim.lr": POSITIVE,
    "optim.lr_by_size": each(POSITIVE),
    "optim.base_batch": POSITIVE,
    "optim.lr_scaling": one_of("sqrt", "linear", "none"),
    "optim.betas": each(FRACTION, count=2),
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup": NON_NEGATIVE,
    "optim.min_lr_ratio": interval("[0, 1]"),
    # Not 0 (no step moves the weights) nor negative (steps go uphill); inf: no clipping.
    "optim.grad_clip": interval("(0, inf]"),
    "optim.muon_lr": POSITIVE,
    "optim.muon_momentum": FRACTION,
    "optim.muon_weight_decay": NON_NEGATIVE,
    "data.source": one_of("poetry", "jsonl", "hf", "prepared"),
    "data.prepared_dir": TEXT,
    "data.paths": each(TEXT),
    "data.text_field": TEXT,
    "data.hf_name": matches(r"(\S(.*\S)?)?", "a dataset name or a local path on one line"),
    "data.hf_split": TEXT,
    "data.hf_config": TEXT,
    "data.script": one_of("simplified", "keep"),
    "data.genre_caps": each(NON_NEGATIVE),
    "data.val_fraction": interval("(0, 1)"),
    "data.split_seed": interval("[0, 4294967295]"),
    "data.stride": Rule(
        lambda v, c: isinstance(v, int) and 0 < v <= _context(c),
        lambda c: f"must be in 1..model.context_length ({_context(c)})",
    ),
    "data.cache_dir": TEXT,
    "data.on_bad_record": one_of("error", "skip"),
    "trainer.max_steps": POSITIVE,
    "trainer.max_epochs": POSITIVE,
    "trainer.max_time": POSITIVE,
    "trainer.eval_every": POSITIVE,
    "trainer.eval_batches": POSITIVE,
    "trainer.log_every": POSITIVE,
    "trainer.sample_tokens": POSITIVE,
    "trainer.sample.temperature": NON_NEGATIVE,  # 0: greedy
    "trainer.sample.top_k": NON_NEGATIVE,  # 0: off
    "trainer.sample.top_p": interval("(0, 1]"),  # 1: off
    "trainer.sample.repetition_penalty": POSITIVE,  # 1: off
    "trainer.sample.prompts": each(TEXT, min_count=1),
    "trainer.sample.per_prompt": POSITIVE,
    "trainer.on_nan": one_of("stop", "skip", "rollback"),
    "trainer.nan_lr_factor": interval("(0, 1)"),
    "trainer.early_stop_patience": POSITIVE,
    "trainer.overfit_batches": NON_NEGATIVE,
    "trainer.profile_steps": NON_NEGATIVE,
    "checkpoint.dir": TEXT,
    "checkpoint.every_steps": POSITIVE,
    "checkpoint.every_minutes": POSITIVE,
    "checkpoint.keep_last": POSITIVE,
    "tracking.uri": Rule(tracking_uri_ok, lambda _: f"is not a store MLflow opens; use {URI_HELP}"),
    "tracking.experiment_name": EXPERIMENT_NAME,
    "tracking.run_name": TEXT,
    "tracking.timeout": POSITIVE,
    "tracking.tags": each(TEXT),
    "tracking.register": LABEL,  # a registered model's name: it goes into models:/NAME/VERSION URIs
}

# Conditions on several keys at once: (what is wrong, when).
NEEDS: list[tuple[str, Callable[[Any], bool]]] = [
    (
        "data=jsonl needs data.paths, e.g. 'data.paths=[corpus.jsonl]'",
        lambda c: _get(c, "data.source") == "jsonl" and not _get(c, "data.paths"),
    ),
    (
        "data=hf needs data.hf_name (a dataset name or a local path)",
        lambda c: _get(c, "data.source") == "hf" and not _get(c, "data.hf_name"),
    ),
    (
        "set one of trainer.max_steps, trainer.max_epochs, trainer.max_time",
        lambda c: all(_get(c, f"trainer.{k}") is None for k in ("max_steps", "max_epochs", "max_time")),
    ),
]


def _nonfinite(v: Any) -> bool:
    """inf or nan, or a list or dict holding one."""
    items = list(v.values()) if isinstance(v, Mapping) else [v] if isinstance(v, (str, int, float)) else list(v)
    return any(isinstance(x, float) and not math.isfinite(x) for x in items)


def _show(v: Any) -> str:
    """A value as the user typed it on the command line: true, 0.5, 'x'."""
    return str(v).lower() if isinstance(v, bool) else repr(v)


def problems(cfg: Any, section: str = "") -> list[str]:
    """What is wrong with `cfg` (a DictConfig, a RunConfig or nested dicts),
    one message per key; `section` ("model") checks only that part's keys."""
    from omegaconf import OmegaConf

    if not section and not OmegaConf.is_config(cfg):  # so that interpolations (optim.lr's default) resolve
        cfg = OmegaConf.create(asdict(cfg) if is_dataclass(cfg) else cfg)
    out = [] if section else [m for m in [_no_default_lr(cfg)] if m]
    for key, rule in RULES.items():
        if not key.startswith(section) or (key == "optim.lr" and out and not section):
            continue
        try:
            value, optional = _get(cfg, key), optional_type(LEAVES[key][0])
        except (KeyError, AttributeError):  # a section from elsewhere (GPTConfig) need not hold every key
            if section:
                continue
            raise
        if value is None and not optional:
            out.append(f"{key}=null {rule.valid(cfg)}")
        elif value is not None and not rule.ok(value, cfg):
            words = rule.nonfinite if rule.nonfinite and _nonfinite(value) else rule.valid(cfg)
            out.append(f"{key}={_show(value)} {words}{' (or null)' if optional else ''}")
    if not section:
        out += [message for message, wrong in NEEDS if wrong(cfg)]
    return out


def validate(cfg: Any) -> None:
    """Every key's value against RULES and NEEDS, and no appended unknown key;
    one ConfigError listing every problem, each naming its key."""
    if hasattr(cfg, "keys"):
        unknown = unknown_keys(cfg, RunConfig)
        if unknown:
            raise ConfigError("unknown key(s): " + "; ".join(f"{key} ({valid_keys(key)})" for key in unknown))
    found = problems(cfg)
    if found:
        raise ConfigError("; ".join(found))


def _no_default_lr(cfg: Any) -> str:
    """optim.lr left to optim.lr_by_size for a model size the table lacks."""
    from omegaconf import OmegaConf

    o, name = cfg.optim, cfg.model.name
    if not OmegaConf.is_config(o) or not OmegaConf.is_interpolation(o, "lr") or name in o.lr_by_size:
        return ""
    return (
        f"optim.lr: model.name={name} has no default LR in optim.lr_by_size "
        f"({', '.join(o.lr_by_size)}); set optim.lr=... or optim.lr_by_size.{name}=..."
    )


def check_model(model: Mapping) -> None:
    """`model` (the run config's model section, as a mapping) against RULES."""
    found = problems({"model": model}, "model.")
    if found:
        raise ConfigError("; ".join(found))
