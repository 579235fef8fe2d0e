"""Typed schema of a run, and where its YAML lives.

The dataclasses are registered in Hydra's ConfigStore as `lingmao_schema`,
the first entry of conf/config.yaml's defaults list, so an unknown key or a
wrong type fails at compose time naming the key. `experiments/*.yaml` are
registered as the `experiment` group (package `_global_`), which works from the
repository and from an installed wheel alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    """conf/ or experiments/: inside the package when installed from a wheel,
    at the repository top level when run from a checkout or an editable install."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lingmao: cannot find its {name}/ folder next to {_PKG}")


CONF_DIR = _find("conf")
EXPERIMENTS_DIR = _find("experiments")


@dataclass
class HardwareConfig:
    # Optional everywhere so `auto` can leave a key to the detected preset; the
    # plan checks that every key has a value once the preset is resolved.
    name: str = "auto"
    device: Optional[str] = None  # cpu | cuda | mps
    devices: Optional[int] = None
    memory_gb: Optional[float] = None
    peak_tflops: Optional[float] = None
    compute_capability: Optional[float] = None
    precision: Optional[str] = None  # auto | bf16 | fp16 | fp32
    batch: Optional[Any] = None  # micro-batch per device: int, or "auto"
    accumulation: Optional[int] = None
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None
    persistent_workers: Optional[bool] = None
    prefetch_factor: Optional[int] = None
    compile: Optional[bool] = None
    compile_mode: Optional[str] = None
    tf32: Optional[bool] = None
    cudnn_benchmark: Optional[bool] = None
    alloc_conf: Optional[str] = None
    threads: Optional[int] = None
    ddp_backend: Optional[str] = None
    fallback: bool = False  # run on what exists when the preset's device is absent


@dataclass
class MoEConfig:
    # Seed 004's use_moe; defaults are MiniMind's (4 experts, top 2, aux 0.01)
    # but with experts 0 (off), and the Switch Transformer's capacity 1.25.
    experts: int = 0  # 0: a dense MLP in every block
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01


@dataclass
class ModelConfig:
    name: str = "small"
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 8
    context_length: int = 512
    dropout: float = 0.1
    mlp_ratio: int = 4
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Speedrun switches (modded-nanoGPT). These defaults are what a model had
    # before the switch existed, so older checkpoints still resume
    # (checkpoint.check_compatible); conf/model/*.yaml turn rotary on.
    rotary: bool = False
    qk_norm: bool = False
    mlp: str = "gelu"  # gelu | relu2
    vocab_multiple: int = 1
    zero_init_proj: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-5
    base_batch: int = 16
    lr_scaling: str = "sqrt"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: Optional[bool] = None
    # optim=muon only: Muon for the blocks' matrices, at its own LR (at base_batch)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass
class DataConfig:
    source: str = "poetry"  # poetry | jsonl | hf | prepared
    paths: List[str] = field(default_factory=list)
    text_field: str = "text"
    hf_name: str = ""
    hf_split: str = "train"
    hf_config: Optional[str] = None
    script: str = "simplified"
    genre_caps: Dict[str, int] = field(default_factory=dict)
    val_fraction: float = 0.02
    stride: Optional[int] = None
    cache_dir: Optional[str] = None
    on_bad_record: str = "error"
    prepared_dir: Optional[str] = None  # data=prepared: a folder prepare() wrote, loaded as it is


@dataclass
class SampleConfig:
    """Decoding of the generation test at every eval."""
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; seed 004: 1.2
    prompts: List[str] = field(default_factory=lambda: ["床前明月光", "明月几时有", "子曰"])
    greedy_baseline: bool = False  # also decode greedily, no penalty: samples/greedy_rep4 ...


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 1000
    max_epochs: Optional[int] = None
    max_time: Optional[float] = None
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    sample_tokens: int = 48
    sample: SampleConfig = field(default_factory=SampleConfig)
    progress: bool = True
    on_nan: str = "stop"  # stop | skip | rollback, for a non-finite loss or gradient (fp16: the GradScaler's)
    nan_lr_factor: float = 0.5  # on_nan=rollback multiplies the LR by this
    early_stop_patience: Optional[int] = None  # scheduled evals without a val/loss improvement; None: off


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: Optional[int] = None
    every_minutes: Optional[float] = 30.0
    keep_last: int = 2


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None
    experiment_name: str = "lingmao"
    run_name: Optional[str] = None
    system_metrics: bool = True  # CPU/RAM/disk/network (and GPU with nvidia-ml-py) every 10 s
    timeout: float = 30.0  # seconds any wait on the store may last; then the spool takes the records


@dataclass
class NightConfig:
    start: str = "21:00"  # seed 000: 晚上9点至早上8点
    end: str = "08:00"


@dataclass
class RunConfig:
    seed: int = 1337
    plan: bool = False
    resume: str = "auto"
    experiment: Optional[str] = None
    night_mode: bool = False
    night: NightConfig = field(default_factory=NightConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


_SCHEMAS = {c.__name__: c for c in (HardwareConfig, ModelConfig, OptimConfig, DataConfig, TrainerConfig,
                                    CheckpointConfig, TrackingConfig, NightConfig,
                                    MoEConfig, SampleConfig)}

# Values a key may take; checked by `validate` so the message can list them.
CHOICES = {
    "hardware.device": ("cpu", "cuda", "mps"),
    "hardware.precision": ("auto", "bf16", "fp16", "fp32"),
    "hardware.ddp_backend": ("nccl", "gloo"),
    "optim.name": ("adamw", "muon"),
    "optim.lr_scaling": ("sqrt", "linear", "none"),
    "model.mlp": ("gelu", "relu2"),
    "data.source": ("poetry", "jsonl", "hf", "prepared"),
    "data.script": ("simplified", "keep"),
    "data.on_bad_record": ("error", "skip"),
}


class ConfigError(ValueError):
    """A config value that composes but cannot run; the message names the key."""


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys added with `+key=...`, which Hydra lets past the typed schema."""
    known = {f.name: f.type for f in fields(schema)}
    out = []
    for key in node.keys():
        if key not in known:
            out.append(f"{prefix}{key}")
        elif is_dataclass(_SCHEMAS.get(known[key])):
            out += _unknown_keys(node[key], _SCHEMAS[known[key]], f"{prefix}{key}.")
    return out


def validate(cfg: Any) -> None:
    """Checks Hydra's typing cannot express: unknown appended keys, choices
    and positive numbers."""
    if hasattr(cfg, "keys"):
        unknown = _unknown_keys(cfg, RunConfig)
        if unknown:
            raise ConfigError(f"unknown key(s): {', '.join(unknown)}; valid top-level keys: "
                              f"{', '.join(f.name for f in fields(RunConfig))}")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    positive = ["optim.lr", "model.d_model", "model.n_heads", "model.n_layers", "model.context_length",
                "trainer.eval_every", "trainer.log_every", "checkpoint.keep_last", "optim.base_batch",
                "model.vocab_multiple", "optim.muon_lr"]
    for key in ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "checkpoint.every_steps"):
        if _get(cfg, key) is not None:
            positive.append(key)
    for key in ("hardware.accumulation", "hardware.devices"):
        if _get(cfg, key) is not None:
            positive.append(key)
    for key in positive:
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    batch = cfg.hardware.batch
    if batch is not None and batch != "auto" and not (isinstance(batch, int) and batch > 0):
        raise ConfigError(f"hardware.batch={batch!r} must be a positive integer or 'auto'")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model} must be divisible by model.n_heads={cfg.model.n_heads}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if cfg.model.rotary and (cfg.model.d_model // cfg.model.n_heads) % 2:
        raise ConfigError(f"model.rotary=true needs an even head size; model.d_model/model.n_heads = "
                          f"{cfg.model.d_model // cfg.model.n_heads}")
    if not 0 <= cfg.optim.muon_momentum < 1 or cfg.optim.muon_weight_decay < 0:
        raise ConfigError(f"optim.muon_momentum={cfg.optim.muon_momentum} must be in [0, 1) and "
                          f"optim.muon_weight_decay={cfg.optim.muon_weight_decay} >= 0")
    moe = cfg.model.moe
    if moe.experts < 0 or (moe.experts and not 1 <= moe.top_k <= moe.experts):
        raise ConfigError(f"model.moe: experts={moe.experts}, top_k={moe.top_k}; need experts >= 0 and "
                          f"1 <= top_k <= experts when experts > 0")
    if moe.capacity_factor <= 0 or moe.aux_loss_weight < 0:
        raise ConfigError("model.moe.capacity_factor must be > 0 and model.moe.aux_loss_weight >= 0")
    sm = cfg.trainer.sample
    if not (0 < sm.top_p <= 1 and sm.repetition_penalty > 0 and sm.top_k >= 0 and sm.prompts):
        raise ConfigError(f"trainer.sample: top_p={sm.top_p} must be in (0, 1], repetition_penalty="
                          f"{sm.repetition_penalty} > 0, top_k={sm.top_k} >= 0, prompts not empty")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    stride = cfg.data.stride
    if stride is not None and not 0 < stride <= cfg.model.context_length:
        raise ConfigError(f"data.stride={stride} must be in 1..model.context_length ({cfg.model.context_length})")
    if cfg.data.source == "jsonl" and not cfg.data.paths:
        raise ConfigError("data=jsonl needs data.paths, e.g. 'data.paths=[corpus.jsonl]'")
    if cfg.data.source == "hf" and not cfg.data.hf_name:
        raise ConfigError("data=hf needs data.hf_name (a dataset name or a local path)")
    if cfg.trainer.max_steps is None and cfg.trainer.max_epochs is None and cfg.trainer.max_time is None:
        raise ConfigError("set one of trainer.max_steps, trainer.max_epochs, trainer.max_time")


def register() -> None:
    """Register the schema and the experiment presets with Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="lingmao_schema", node=RunConfig)
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")
